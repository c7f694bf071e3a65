"""lmms-eval model `dense_connector`: evaluate any Dense Connector checkpoint with lmms-eval's tasks.

    python -m lmms_eval --model dense_connector --model_args pretrained=FOLDER[,dtype=bfloat16,device_map=auto] \
        --tasks pope,mme --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model dense_connector ...   (data-parallel, one GPU each)

The package registers the model through lmms-eval's `lmms_eval.models` entry points (`pip install -e ".[eval]"`).
It loads the checkpoint with the Auto classes (a local folder without asking the Hub), prompts with the checkpoint's
chat template (images first, as the authors' evaluation scripts do), pads on the left, decodes greedily unless the
task asks for sampling, and stops at the checkpoint's stop tokens and at the task's `until` strings.
"""

from collections import defaultdict

from accelerate import Accelerator
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from ..evaluation.generator import Answerer, GenerationSettings, load_pretrained, resolve_device


MODEL_NAME = "dense_connector"
DEFAULT_MAX_NEW_TOKENS = 128  # the authors' model_vqa_loader default; tasks usually set their own


def manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point hands lmms-eval: the name and where the class lives."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.DenseConnectorLMM")


def settings_from(gen_kwargs: dict) -> GenerationSettings:
    """lmms-eval's per-task generation arguments as `GenerationSettings`."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    return GenerationSettings(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        temperature=temperature,
        top_p=gen_kwargs.get("top_p"),
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        until=until,
    )


class DenseConnectorLMM(lmms):
    """A Dense Connector checkpoint as an lmms-eval model (image and text tasks, `generate_until`)."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        device_map: str | None = None,
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,  # lmms-eval passes it with --max_batch_size; batches are fixed here
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"Unknown model_args for {MODEL_NAME}: {', '.join(unknown)}. Known: pretrained, device, dtype, "
                "device_map, batch_size, attn_implementation, trust_remote_code."
            )
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data-parallel: one full copy of the model per process
            device, device_map = str(self.accelerator.device), None
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        device = resolve_device(device or "auto")
        remote_code = trust_remote_code in (True, "True", "true")  # model_args may arrive as text
        model, processor = load_pretrained(
            pretrained, device, dtype, device_map or None, attn_implementation, remote_code
        )
        self.answerer = Answerer(model, processor)
        self.batch_size_per_device = int(batch_size)
        self._device = model.device

    @property
    def model(self):
        return self.answerer.model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    def generate_until(self, requests) -> list[str]:
        """Answers in request order; requests are grouped by task and generation arguments, longest prompts first."""
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            context, gen_kwargs, _, _, task, split = request.args
            groups[(task, split, repr(sorted(gen_kwargs.items())))].append(index)
        answers: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding") as bar:
            for indices in groups.values():
                indices.sort(key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    for index, text in zip(batch, self._answer([requests[i].args for i in batch])):
                        answers[index] = text
                    bar.update(len(batch))
        return answers

    def _answer(self, args: list[tuple]) -> list[str]:
        images = []
        for _, _, doc_to_visual, doc_id, task, split in args:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            images.append([visual.convert("RGB") for visual in visuals])
        return self.answerer.answer(images, [arg[0] for arg in args], settings_from(dict(args[0][1])))

    def loglikelihood(self, requests):
        raise NotImplementedError(
            f"{MODEL_NAME} answers generation tasks (output_type: generate_until), the type of every benchmark the "
            "paper reports; multiple-choice tasks scored by log-likelihood are not supported."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME} does not run multi-round tasks; use single-turn generation tasks.")
