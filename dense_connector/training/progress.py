"""Progress you can read while training: throughput and ETA in the logs, a loss curve at the end, an eval task.

`Throughput` (a `TrainerCallback`) counts the text and image tokens and the records of every training batch
(`DenseConnectorTrainer.compute_loss` hands it the inputs) and adds, to each training log, `tokens_per_second`
(with `text_tokens_per_second` and `image_tokens_per_second`), `samples_per_second` (since the last log, over all
processes) and `eta_seconds`; the Trainer then reports them like its own metrics (console, TensorBoard, W&B).
`LossCurveCallback` draws `loss_curve.png` in the output folder when training ends (matplotlib optional).
`ShapesTask` asks the demo's held-out shapes questions (`dense_connector.demo_data`) and scores exact match.
"""

import datetime
import logging
import time
from pathlib import Path

import torch
from transformers import IntervalStrategy, TrainerCallback


logger = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"


class Throughput(TrainerCallback):
    """Tokens (text, image) and records per second since the previous log, and the time left."""

    def __init__(self, image_token_id: int | None):
        self.image_token_id = image_token_id
        self.counts = torch.zeros(3, dtype=torch.float64)  # text tokens, image tokens, records
        self.logged, self.last_time, self.start_time, self.start_step = self.counts.clone(), None, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = time.perf_counter()
        self.start_step = state.global_step  # a resumed run's ETA counts only the steps this run made

    def count(self, inputs: dict) -> None:
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            return
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else input_ids.numel()
        images = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        positions = inputs.get("position_ids")
        if mask is None and positions is not None:  # a padding-free row: a record starts at every position 0
            records = int((positions == 0).sum())
        else:
            records = input_ids.shape[0] if input_ids.dim() > 1 else 1
        self.counts += torch.tensor([tokens - images, images, records], dtype=torch.float64)

    def metrics(self, trainer) -> dict[str, float]:
        """This log's throughput over all processes (a collective: every process logs at the same steps)."""
        now, state = time.perf_counter(), trainer.state
        local, self.logged = self.counts - self.logged, self.counts.clone()  # this log's window: small numbers
        window = trainer.accelerator.reduce(local.to(trainer.args.device), "sum").cpu()
        seconds = max(now - (self.last_time or now), 1e-9)
        self.last_time = now
        done = state.global_step - self.start_step
        left = max(state.max_steps - state.global_step, 0)
        eta = (now - self.start_time) / done * left if done > 0 and self.start_time else 0.0
        text, images, records = (window / seconds).tolist()
        metrics = {
            "tokens_per_second": round(text + images, 1),
            "text_tokens_per_second": round(text, 1),
            "image_tokens_per_second": round(images, 1),
            "samples_per_second": round(records, 3),
            "eta_seconds": round(eta, 1),
        }
        if state.is_world_process_zero:
            rates = f"{text + images:,.0f} tokens/s (text {text:,.0f}, image {images:,.0f}), {records:.2f} samples/s"
            left = datetime.timedelta(seconds=round(eta))
            logger.info(f"step {state.global_step}/{state.max_steps}: {rates}, ETA {left}")
        return metrics


class LossCurveCallback(TrainerCallback):
    """`loss_curve.png` in the output folder at the end of training: the training loss and any eval metrics."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            draw_loss_curve(state.log_history, Path(args.output_dir) / LOSS_CURVE)


def draw_loss_curve(history: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        logger.info(f"matplotlib is not installed, so no {LOSS_CURVE} (pip install matplotlib)")
        return None
    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    if not train:
        logger.info(f"no training loss was logged (--logging_steps is more than the steps run), so no {LOSS_CURVE}")
        return None
    evals = {}
    for entry in history:
        for key, value in entry.items():
            if key.startswith("eval_") and isinstance(value, int | float) and not key.endswith(("runtime", "second")):
                evals.setdefault(key, []).append((entry["step"], value))
    figure, axis = pyplot.subplots(figsize=(7, 4))
    axis.plot(*zip(*train), label="training loss")
    if "eval_loss" in evals:
        axis.plot(*zip(*evals.pop("eval_loss")), "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if evals:
        other = axis.twinx()
        for key, points in evals.items():
            other.plot(*zip(*points), "s--", label=key, color="tab:green")
        other.set_ylabel("eval metric")
        other.legend(loc="upper right")
    axis.legend(loc="upper left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


class ShapesTask:
    """The demo's shapes questions on `samples` held-out images, asked with the training template, exact match."""

    name = "shapes"

    def __init__(self, samples: int = 16):
        from ..demo_data import HELDOUT_SEED, make_examples, to_conversation

        self.examples = make_examples(samples, HELDOUT_SEED)
        self.to_conversation = to_conversation

    def records(self) -> list[dict]:
        """The held-out questions as records (images in them), whose eval loss the Trainer computes."""
        return [{**self.to_conversation(example, ""), "image": example.image} for example in self.examples]

    def schedule(self, training_args) -> None:
        """Evaluate every --eval_steps (default: every --logging_steps) when no eval strategy is set."""
        if training_args.eval_strategy == IntervalStrategy.NO:
            training_args.eval_strategy = IntervalStrategy.STEPS
            training_args.eval_steps = training_args.eval_steps or training_args.logging_steps

    def __call__(self, model, processor) -> dict[str, float]:
        from ..demo_data import evaluate

        was_training = model.training
        model.eval()
        try:
            accuracy, _ = evaluate(model, processor, self.examples, batch_size=len(self.examples))
        finally:
            model.train(was_training)
        return {f"{self.name}_exact_match": accuracy}
