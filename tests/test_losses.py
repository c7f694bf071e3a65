"""Losses that never hold the full logits (`--use_liger_kernel`, `--loss_chunk_size`): the stock loss and gradients,
padded or padding-free, less memory with a 128K vocabulary, and the same training through `dense-connector train`."""

import logging

import pytest
import torch
import torch.nn.functional as F
from test_padding_free import RECORDS, loss_and_gradients
from test_training import save_tiny_checkpoint, two_logged_steps, write_dataset
from tiny import tiny_config, tiny_model, tiny_processor

from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.measurement import peak_bytes
from dense_connector.training import DenseConnectorDataCollator, prepare_for_training, use_memory_efficient_loss


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(tiny_config(), chat_template=CHAT_TEMPLATES["vicuna_v1"])


def stock_summed_loss(model, batch) -> torch.Tensor:
    """The summed cross-entropy from the model's logits (its own loss hook switched off)."""
    hook, model.hidden_states_loss = model.hidden_states_loss, None
    try:
        logits = model(**batch).logits
    finally:
        model.hidden_states_loss = hook
    labels = F.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_chunked_cross_entropy_is_the_stock_loss(processor, padding_free):
    model = prepare_for_training(tiny_model(tiny_config()), "projector+lm").train()
    batch = DenseConnectorDataCollator(processor, padding_free=padding_free)(RECORDS)
    loss, grads = loss_and_gradients(model, batch)
    assert "never held" in use_memory_efficient_loss(model, liger=False, chunk_size=7)  # several chunks per batch
    assert model(**batch).logits is None
    chunked_loss, chunked_grads = loss_and_gradients(model, batch)
    torch.testing.assert_close(chunked_loss, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == chunked_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # the Trainer's token count over all gradient-accumulation batches divides the sum
        summed = stock_summed_loss(model, batch)
        torch.testing.assert_close(model(**batch, num_items_in_batch=torch.tensor(11)).loss, summed / 11)
        assert model.eval()(**batch).logits is not None  # out of training the logits are computed as always


def test_chunked_cross_entropy_never_holds_the_logits_of_a_128k_vocabulary(processor):
    config = tiny_config()
    config.text_config.vocab_size = 128256  # Llama-3's
    model = prepare_for_training(tiny_model(config), "projector+lm").train()
    batch = DenseConnectorDataCollator(processor, padding_free=True)(RECORDS)
    logits_bytes = batch["input_ids"].numel() * 128256 * 4

    def step():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    stock = peak_bytes(step, "cpu")
    use_memory_efficient_loss(model, liger=False, chunk_size=16)
    chunked = peak_bytes(step, "cpu")
    assert stock > 2 * logits_bytes  # the logits, their float32 copy and gradient
    assert chunked < stock - 2 * logits_bytes, (chunked, stock)


def test_use_liger_kernel_on_cpu_says_so_and_trains_as_without(processor, tmp_path, caplog):
    save_tiny_checkpoint(tmp_path / "base", processor)
    data = write_dataset(tmp_path / "data", 4)
    runs = {}
    for name, extra in {"stock": [], "liger": ["--use_liger_kernel"]}.items():
        with caplog.at_level(logging.WARNING):
            _, runs[name] = two_logged_steps(tmp_path / "base", data, tmp_path / name, extra)
    assert "Liger's kernels are Triton, for CUDA GPUs" in caplog.text
    assert len(runs["stock"]) == 2 and runs["liger"] == pytest.approx(runs["stock"], rel=1e-4)
