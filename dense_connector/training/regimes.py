"""The training regimes of the original: which parameters train in each stage, and LoRA on the language model."""

import re

from torch import nn


TUNE_REGIMES = ("projector", "projector+lm", "lora")


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Names of the language model's linear layers (`q_proj`, ..., `down_proj` for Llama): the LoRA targets."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.model.language_model.named_modules()
            if isinstance(module, nn.Linear)
        }
    )


def prepare_for_training(
    model: nn.Module,
    tune: str = "projector+lm",
    freeze_vision_tower: bool = True,
    lora_r: int = 128,
    lora_alpha: int = 256,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | None = None,
) -> nn.Module:
    """Set which parameters train, as in the original recipes, and return the model to train.

    - `"projector"` (stage 1, pre-training): only the projector (and AnyRes `image_newline`).
    - `"projector+lm"` (stage 2, instruction tuning): the projector, the language model and its head.
    - `"lora"`: LoRA adapters on the language model's linear layers (through `peft`), with the projector fully
      trained and saved with the adapter (`modules_to_save`); returns the `PeftModel`. AnyRes `image_newline` stays
      frozen in this regime, since `peft` saves whole modules only.

    `freeze_vision_tower=False` trains the tower too (saved with the adapter under LoRA). Activation checkpointing
    (`model.activation_checkpointing_enable()`, `--activation_checkpointing` in the Trainer; `gradient_checkpointing`
    before transformers 5.20) works in every regime,
    reentrant or not: transformers checkpoints the layers' `forward`, so the hooks through which the connector reads
    the tower's hidden states see the checkpointed outputs, and it makes the input embeddings require grad for frozen
    language models.
    """
    if tune not in TUNE_REGIMES:
        raise ValueError(f"tune={tune!r} is not a training regime; use one of {TUNE_REGIMES}.")
    inner = model.model
    model.requires_grad_(False)
    inner.connector.requires_grad_(True)
    if inner.image_newline is not None:
        inner.image_newline.requires_grad_(tune != "lora")
    if tune == "projector+lm":
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if not freeze_vision_tower:
        inner.vision_tower.requires_grad_(True)
    if tune != "lora":
        return model

    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules or language_model_linear_names(model)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=rf".*\.language_model\..*\.({'|'.join(map(re.escape, targets))})",
        modules_to_save=["projector"] + ([] if freeze_vision_tower else ["vision_tower"]),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameter_summary(model: nn.Module) -> str:
    """`"trainable: N / M parameters (P%)"` for logs."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable: {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
