"""Building a new Dense Connector checkpoint from a vision tower and a causal language model, as the authors' training
starts: the tower's vision model (any patch-token encoder transformers has, from a full repository such as `CLIPModel`
or a vision-only one; SigLIP run as the original runs it, without its last layer and head), the language model (any
causal LM, its tensors renamed and fused as transformers loads them), and a freshly initialised projector (plain
`nn.Linear` layers, PyTorch's default initialisation, as the original creates it). `prepare_build` decides everything
first (tower config, tokenizer with `<image>`/`<video>` and the pad token of the conversation version, config with the
connector options, processor, generation config); `build_checkpoint` then plans every tensor, streams the parts'
weights into safetensors shards (bit for bit, or fused by transformers' own converters; never holding a model in
memory), writes remote code, processor, chat
template and model card into a staging folder, loads and probes it, and only then moves it into place; `build_model`
reads the same tensors into a model in memory. It reuses the conversion's pieces (`dense_connector.conversion`) for
everything a converted folder has too.
"""

import functools
import logging
import os
import re
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from ..chat_templates import CHAT_TEMPLATES, STOP_TOKENS, VERSION_TEMPLATES, with_media_placeholders
from ..configuration_dense_connector import DenseConnectorConfig
from ..connector_dense_connector import DenseConnector
from ..modeling_dense_connector import DenseConnectorForConditionalGeneration
from ..processing_dense_connector import DenseConnectorProcessor
from ..writing.folder import build_generation_config, build_processor, summarize_dropped, write_code
from ..writing.load_rules import LoadRules
from ..writing.sources import CheckpointError, read_json, resolve_source, source_weights, tensor_metadata
from ..writing.staging import DTYPES, check_output, staged_output
from ..writing.tensors import PlanBuilder, TensorPlan, read_planned, write_weights
from ..writing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, convert_tokenizer, padded_vocab_size
from ..writing.towers import BOOKKEEPING_FIELDS, Tower, Translation, describe_tower
from ..writing.verify import check_folder


logger = logging.getLogger(__name__)


class BuildError(CheckpointError):
    """A checkpoint cannot be built from these parts; the message says what was found and what to do."""


# `--version`: the original's names of the formats a model chats in (not stage 1's `plain`) -> this package's chat
# template, and `native`: the LM's own.
VERSIONS = {name: template for name, template in VERSION_TEMPLATES.items() if template in STOP_TOKENS}
VERSIONS["native"] = "native"
LLAMA_3_PAD = "<|reserved_special_token_0|>"  # what the original's training pads Llama-3 with
LM_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # config and tokenizer files of a Hub LM


@dataclass
class ConnectorOptions:
    """The build options that shape the connector (the paper's ablations); `None` takes the config's defaults."""

    connector: str = "dci"
    dense_connector_layers: list[int] | None = None
    dense_connector_groups: list[list[int]] | None = None
    vision_feature_layer: int | None = None
    projector_depth: int = 2
    image_downsample_factor: int = 1


@dataclass
class Build:
    """Everything decided before any weight is written."""

    tower_source: str
    tower_folder: Path
    tower: Tower
    lm_source: str
    lm_folder: Path
    lm_prefix: str
    lm_vocab_size: int
    version: str
    tokenizer: PreTrainedTokenizerBase
    config: DenseConnectorConfig
    processor: DenseConnectorProcessor
    generation_config: GenerationConfig
    dtype: torch.dtype


def read_language_model(source: str) -> tuple[Path, dict, str]:
    """The LM's folder, its config, and the prefix its causal-LM state dict puts before the base model's names."""
    folder = resolve_source(source, "language model", LM_PATTERNS)
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    causal = [name for name in architectures if name.endswith(("ForCausalLM", "LMHeadModel"))]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type not in MODEL_MAPPING_NAMES or not causal:
        raise BuildError(
            f"The language model {source} has model_type={model_type!r} and architectures={architectures}; a Dense "
            "Connector needs a causal language model that transformers knows (LlamaForCausalLM, Qwen2ForCausalLM, "
            "...)."
        )
    for field, why in (("auto_map", "needs remote code"), ("quantization_config", "is quantized")):
        if field in config:
            raise BuildError(
                f"The language model {source} {why} ({field} in its config.json), which is not supported."
            )
    if not (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        raise BuildError(
            f"The language model {source} has no tokenizer (neither tokenizer.model nor tokenizer.json); give the "
            "folder or Hub repository that holds the model with its tokenizer."
        )
    if "text_config" in config or config.get("is_encoder_decoder"):
        raise BuildError(f"The language model {source} is not a plain causal language model ({model_type!r}).")
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return folder, config, model_class.base_model_prefix


def lm_model_max_length(lm_folder: Path) -> int | None:
    """The `model_max_length` the LM's tokenizer config sets, unless it is transformers' "no limit" placeholder."""
    if not (lm_folder / "tokenizer_config.json").is_file():
        return None
    length = read_json(lm_folder / "tokenizer_config.json").get("model_max_length")
    return length if isinstance(length, int) and length < 10**9 else None


def default_version(tokenizer: PreTrainedTokenizerBase) -> str:
    """`llama_3` for a Llama-3 tokenizer, `vicuna_v1` for a Llama/Vicuna one (`<unk>` and `</s>`), else `native`."""
    vocab = tokenizer.get_vocab()
    if "<|eot_id|>" in vocab:
        return "llama_3"
    if tokenizer.unk_token is not None and "</s>" in vocab:
        return "vicuna_v1"
    return "native"


def set_pad_token(tokenizer: PreTrainedTokenizerBase, version: str, source: str) -> None:
    """The pad token the original's training sets: unk for `v1`, `<|reserved_special_token_0|>` for `llama_3`; a
    language model with its own template keeps its pad token (else the conversion's choice)."""
    if version == "vicuna_v1":
        if tokenizer.unk_token is None:
            raise BuildError(f"The tokenizer of {source} has no unk token, which the v1 version pads with.")
        tokenizer.pad_token = tokenizer.unk_token
    elif version == "llama_3":
        if LLAMA_3_PAD not in tokenizer.get_vocab():
            raise BuildError(
                f"The tokenizer of {source} has no {LLAMA_3_PAD} token, which the llama_3 version pads with."
            )
        tokenizer.pad_token = LLAMA_3_PAD


def own_chat_template(lm_folder: Path) -> str | None:
    """The language model's own chat template: `chat_template.jinja`, else `tokenizer_config.json`'s (the default
    one of a list of named templates)."""
    if (lm_folder / "chat_template.jinja").is_file():
        return (lm_folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not (lm_folder / "tokenizer_config.json").is_file():
        return None
    template = read_json(lm_folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
    return template or None


def chat_template(lm_folder: Path, version: str, source: str) -> str:
    """This package's template of the version, or (`native`) the LM's own one taking image and video items too."""
    if version != "native":
        return CHAT_TEMPLATES[version]
    template = own_chat_template(lm_folder)
    if not template:
        raise BuildError(
            f"The language model {source} has no chat template of its own (none in tokenizer_config.json or "
            "chat_template.jinja), which --version native uses; pass --version v1 or llama_3 (the original's formats)."
        )
    return with_media_placeholders(template)


def generation_config(tokenizer: PreTrainedTokenizerBase, version: str, lm_folder: Path) -> GenerationConfig:
    """Greedy; stops where the conversation format stops (for `native`, where the LM's own generation config does)."""
    if version != "native":
        try:
            return build_generation_config(tokenizer, version)
        except ValueError as error:
            raise BuildError(f"{error} Is --version right for this language model?") from None
    eos = tokenizer.eos_token_id
    if (lm_folder / "generation_config.json").is_file():
        eos = read_json(lm_folder / "generation_config.json").get("eos_token_id", eos)
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def tied_embeddings(lm_config: dict) -> bool:
    """Whether the LM ties its head to its input embeddings: its config says so, else its config class's default
    (Gemma ties, Llama does not)."""
    tied = lm_config.get("tie_word_embeddings")
    if tied is None:
        tied = transformers.AutoConfig.for_model(lm_config["model_type"]).tie_word_embeddings
    return bool(tied)


def build_config(
    tower: Tower, lm_config: dict, tokenizer, options: ConnectorOptions, dtype: torch.dtype
) -> DenseConnectorConfig:
    """The Dense Connector config. The final feature is the output of the tower's second-to-last layer: `hs[-2]`
    (LLaVA's choice for CLIP, taken for every tower), which for SigLIP is the last layer of the tower the original
    keeps (it cuts the last one). The non-patch tokens the tower has (CLS, registers) are dropped."""
    text = {key: value for key, value in lm_config.items() if key not in BOOKKEEPING_FIELDS or key == "model_type"}
    text.update(
        vocab_size=padded_vocab_size(int(lm_config["vocab_size"]), len(tokenizer)), pad_token_id=tokenizer.pad_token_id
    )
    feature_layer = options.vision_feature_layer
    if feature_layer is None:
        feature_layer = -1 if tower.family == "siglip" else -2
    try:
        config = DenseConnectorConfig(
            vision_config=tower.vision,
            text_config=text,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
            dense_connector_type=options.connector,
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy="default" if tower.prefix_tokens else "full",
            vision_prefix_tokens=tower.prefix_tokens,
            dense_connector_layers=options.dense_connector_layers,
            dense_connector_groups=options.dense_connector_groups,
            projector_hidden_act="gelu",
            projector_depth=options.projector_depth,
            multimodal_projector_bias=True,
            image_downsample_factor=options.image_downsample_factor,
            tie_word_embeddings=tied_embeddings(lm_config),
        )
    except (ValueError, TypeError) as error:
        raise BuildError(f"The connector options do not fit these parts: {error}") from None
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [DenseConnectorForConditionalGeneration.__name__]
    return config


def refused_as_build_errors(function):
    """`function`, with the conversion helpers' refusals (a tower or file they cannot read) raised as `BuildError`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BuildError:
            raise
        except CheckpointError as error:
            raise BuildError(str(error)) from None

    return wrapper


def connector_options_from(options: dict) -> ConnectorOptions:
    try:
        return ConnectorOptions(**options)
    except TypeError as error:
        raise BuildError(
            f"Unknown build option ({error}); the options are {sorted(ConnectorOptions.__dataclass_fields__)}."
        ) from None


@refused_as_build_errors
def prepare_build(
    vision_tower: str | os.PathLike,
    language_model: str | os.PathLike,
    version: str | None = None,
    dtype: str | None = None,
    options: ConnectorOptions | None = None,
) -> Build:
    """Read the parts' configs and tokenizer and decide the config, processor and generation config (no weights)."""
    options = options or ConnectorOptions()
    tower_source, lm_source = str(vision_tower), str(language_model)
    if version == "plain":
        raise BuildError(
            "version='plain' is the format of stage-1 training (examples/finetune.py --version plain), not one to "
            "chat in; build with the format of stage 2 and inference: v1, llama_3 or native."
        )
    if version is not None and version not in VERSIONS:
        raise BuildError(f"version={version!r} is not one of {sorted(VERSIONS)}.")
    tower_folder = resolve_source(tower_source, "vision tower", ["*.json"])
    tower = describe_tower(read_json(tower_folder / "config.json"))
    lm_folder, lm_config, lm_prefix = read_language_model(lm_source)
    if dtype is not None and dtype not in DTYPES:
        raise BuildError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
    stored = lm_config.get("dtype") or lm_config.get("torch_dtype")
    torch_dtype = DTYPES[dtype or (stored if stored in DTYPES else "float32")]

    tokenizer = convert_tokenizer(lm_folder, {"tokenizer_model_max_length": lm_model_max_length(lm_folder)})
    version = VERSIONS[version] if version else default_version(tokenizer)
    set_pad_token(tokenizer, version, lm_source)
    template = chat_template(lm_folder, version, lm_source)
    config = build_config(tower, lm_config, tokenizer, options, torch_dtype)
    preprocessing = "naflex" if config.takes_patch_sequences else "pad"
    processor = build_processor(Translation(config, tower.family, preprocessing), tokenizer, tower_folder, template)
    return Build(
        tower_source,
        tower_folder,
        tower,
        lm_source,
        lm_folder,
        lm_prefix,
        int(lm_config["vocab_size"]),
        version,
        tokenizer,
        config,
        processor,
        generation_config(tokenizer, version, lm_folder),
        torch_dtype,
    )


def rename_lm_tensor(name: str, prefix: str, tied: bool) -> tuple[str | None, str | None]:
    """(new name, None), or (None, why it is dropped), for a tensor of the causal LM's state dict."""
    if name.startswith(f"{prefix}."):
        if name.endswith(".rotary_emb.inv_freq"):
            return None, "rotary-embedding buffer (rebuilt by transformers)"
        return f"model.language_model.{name[len(prefix) + 1 :]}", None
    if name == "lm_head.weight" and tied:
        return None, "LM head tied to the input embeddings"
    return name, None


def place_tower_tensor(name: str, built: set[str], layers_used: int) -> tuple[str | None, str | None]:
    """(new name, None), or (None, why it is dropped), for a tensor of the tower's vision model."""
    if name in built:
        return f"model.vision_tower.{name}", None
    layer = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= layers_used:
        return None, "vision-tower layer that is never run"
    return None, "part of the tower the connector never reads (pooling head, buffer)"


def tower_rules(config: DenseConnectorConfig) -> LoadRules:
    """transformers' loading rules of the tower as built (its layers up to the deepest one read)."""
    with torch.device("meta"):
        return LoadRules(transformers.AutoModel.from_config(config.vision_config))


def language_model_rules(config: DenseConnectorConfig) -> LoadRules:
    """transformers' loading rules of the causal LM (renamings; per-expert tensors fused as it loads them)."""
    with torch.device("meta"):
        return LoadRules(transformers.AutoModelForCausalLM.from_config(config.text_config))


def describe_layers(build: Build) -> str:
    """The hidden states the connector reads, for `build`'s log: final feature, STI/SCI layers or DCI groups."""
    config = build.config
    depth = build.tower.vision["num_hidden_layers"]
    spans = [
        f"hs[{group[0]}..{group[-1]}]" if group == list(range(group[0], group[-1] + 1)) else f"hs{group}"
        for group in config.dense_connector_groups or []
    ]
    extra = {
        "sti": f"layers hs{config.dense_connector_layers}",
        "sci": f"layers hs{config.dense_connector_layers}",
        "dci": f"groups {', '.join(spans)}",
    }.get(config.dense_connector_type, "no extra layers")
    dropped = config.vision_prefix_tokens if config.vision_feature_select_strategy == "default" else 0
    return (
        f"{build.tower.family} tower of {depth} layers: {config.dense_connector_type} connector reads the final "
        f"feature hs[{config.vision_feature_layer}] and {extra}; {config.num_vision_layers_used} layers kept; "
        f"{dropped} non-patch token(s) dropped"
    )


def initial_projector(config: DenseConnectorConfig, folder: Path, seed: int) -> Path:
    """The projector as the original creates it (plain `nn.Linear`, PyTorch's default init), saved to `folder`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = DenseConnector(config).projector
    tensors = {f"model.connector.projector.{name}": tensor.detach() for name, tensor in projector.state_dict().items()}
    path = folder / "projector.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@refused_as_build_errors
def plan_build(build: Build, meta_model: DenseConnectorForConditionalGeneration, projector: Path) -> TensorPlan:
    """Every tensor of the built model: tower (up to the deepest layer read), language model, fresh projector."""
    tied = build.config.tie_word_embeddings
    expected = {name: tuple(tensor.shape) for name, tensor in meta_model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")
    plan = PlanBuilder(expected, build.dtype)
    rules = tower_rules(build.config)
    built, layers_used = set(rules.expected), build.config.num_vision_layers_used
    plan.add_model(
        source_weights(build.tower_source, "vision tower"),
        rules,
        lambda name: place_tower_tensor(name, built, layers_used),
        strip=build.tower.weights_prefix,
    )
    plan.add_model(
        source_weights(build.lm_source, "language model"),
        language_model_rules(build.config),
        lambda name: rename_lm_tensor(name, build.lm_prefix, tied),
    )
    for name, (shape, tensor_dtype) in tensor_metadata(projector).items():
        plan.add(projector, name, name, shape, tensor_dtype)
    return plan.finish(
        build.tower_source,
        "built model",
        unknown_hint="Is --language-model a causal LM whose head is one Linear without bias (not, e.g., Phi-2's), "
        "with its tensors named as transformers saves or converts them (mixture-of-experts: one tensor per expert "
        "as on the Hub, or fused)?",
        mismatch_hint="Check that --vision-tower and --language-model are the parts' own folders or Hub ids.",
    )


BUILD_CARD = """
## How it was built

Built with `dense-connector build` from the vision tower `{tower}` and the language model `{lm}`; the projector is
freshly initialised (PyTorch's default `nn.Linear` initialisation, seed {seed}), so the model must be trained (stage 1:
projector only, then stage 2) before it answers anything.

- Connector `{connector}` (hidden states `{layers}`, final feature `hs[{feature}]`), projector of depth {depth},
  image downsampling {downsample}x per side, image preprocessing `{preprocessing}`, conversation format `{version}`.
- Vision tower ({family}): {tower_layers} encoder layers kept (the deepest one the connector reads), {prefix} leading
  non-patch token(s) (CLS, registers) dropped from the states read. Weights in `{dtype}`.
- Tokenizer: `<image>` (id {image_token_id}) and `<video>` (id {video_token_id}) added, pad token `{pad}`;
  vocabulary {old_vocab} -> {new_vocab} rows (new rows are the mean of the original ones).
- Tensors left out on purpose: {dropped}.
- Check after building: {checks}.
"""


def model_card_section(build: Build, plan: TensorPlan, seed: int, checks: list[str]) -> str:
    """The model card's "How it was built" section."""
    config = build.config
    return BUILD_CARD.format(
        tower=build.tower_source,
        lm=build.lm_source,
        seed=seed,
        connector=config.dense_connector_type,
        layers=config.dense_connector_layers or config.dense_connector_groups or "-",
        feature=config.vision_feature_layer,
        depth=config.projector_depth,
        downsample=config.image_downsample_factor,
        preprocessing="naflex" if config.takes_patch_sequences else "pad",
        version=build.version,
        tower_layers=config.vision_config.num_hidden_layers,
        family=build.tower.family,
        prefix=config.vision_prefix_tokens if config.vision_feature_select_strategy == "default" else 0,
        dtype=config.dtype,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        pad=build.tokenizer.pad_token,
        old_vocab=build.lm_vocab_size,
        new_vocab=config.text_config.vocab_size,
        dropped=summarize_dropped(plan.dropped),
        checks="; ".join(checks),
    )


def build_checkpoint(
    vision_tower: str | os.PathLike,
    language_model: str | os.PathLike,
    output: str | os.PathLike,
    version: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
    **connector_options,
) -> Path:
    """Build a Dense Connector checkpoint folder from a vision tower and a causal LM (local folders or Hub ids).

    `connector_options` are the fields of `ConnectorOptions` (`connector`, `dense_connector_layers`,
    `dense_connector_groups`, `vision_feature_layer`, `projector_depth`, `image_downsample_factor`). The folder is
    written under a temporary name next to `output` and moved into place only after it loaded and passed a forward
    pass; on any failure nothing is left behind. Returns the folder.
    """
    output = Path(output).expanduser().resolve()
    check_output(output, overwrite)
    build = prepare_build(vision_tower, language_model, version, dtype, connector_options_from(connector_options))
    logger.info("Layers: %s", describe_layers(build))
    with torch.device("meta"):
        meta_model = DenseConnectorForConditionalGeneration(build.config)
    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_build(build, meta_model, initial_projector(build.config, Path(scratch), seed))
        with staged_output(output, overwrite) as staging:
            write_weights(plan, staging, max_shard_size, progress=progress)
            write_code(meta_model, staging, build.config)
            build.config.save_pretrained(staging)
            build.generation_config.save_pretrained(staging)
            build.processor.save_pretrained(staging)
            checks = check_folder(staging, build.dtype, None)
            card = meta_model.model_card() + model_card_section(build, plan, seed, checks)
            (staging / "README.md").write_text(card, encoding="utf-8")
    logger.info("Built %s (%s)", output, "; ".join(checks))
    return output


def build_model(
    vision_tower: str | os.PathLike,
    language_model: str | os.PathLike,
    version: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    **connector_options,
) -> DenseConnectorForConditionalGeneration:
    """The model `build_checkpoint` writes, in memory (same weights, same fresh projector for the same `seed`)."""
    build = prepare_build(vision_tower, language_model, version, dtype, connector_options_from(connector_options))
    with torch.device("meta"):
        meta_model = DenseConnectorForConditionalGeneration(build.config)
    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_build(build, meta_model, initial_projector(build.config, Path(scratch), seed))
        with closing(read_planned(plan.entries)) as tensors:
            state_dict = {entry.name: tensor for entry, tensor in tensors}
        model = DenseConnectorForConditionalGeneration.from_pretrained(
            None, config=build.config, state_dict=state_dict, dtype=build.dtype
        )
    model.generation_config = build.generation_config
    return model.eval()


def build_processor_for(
    vision_tower: str | os.PathLike, language_model: str | os.PathLike, version: str | None = None, **connector_options
) -> DenseConnectorProcessor:
    """The processor of the model built from these parts with these options (tokenizer, image preprocessing,
    chat template of the version)."""
    return prepare_build(
        vision_tower, language_model, version, None, connector_options_from(connector_options)
    ).processor
