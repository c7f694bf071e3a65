"""The lean vision feature path (issue 7): the numbers of keeping every hidden state, fewer layers, less memory.

The reference is the plain computation the SPEC describes: the full tower run with `output_hidden_states=True` (every
layer, every state kept), the connector applied to the returned tuple as the original code does (stack and average for
DCI), then our projector.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config, tiny_model
from transformers import AutoModel

from dense_connector.connector_dense_connector import encoder_layers
from dense_connector.measurement import peak_bytes  # the benchmarks' measurement, so test and bench agree


# CLIP with F = hs[-2]; SigLIP with F = hs[-1] (the released setting, on a tower already cut to 26 layers) and with
# F = hs[-2] (the same features read from the uncut tower).
TOWERS = {"clip": {}, "siglip-full": {}, "siglip-skip-last": {"vision_feature_layer": -2}}
CONNECTORS = ("dci", "sci", "sti", "none")


def deep_config(tower: str, connector: str, num_layers: int = 6):
    """A tiny config for a tower of `num_layers` layers (layer and group defaults follow the depth); the config keeps
    only the layers up to the deepest state the connector reads."""
    kind = "clip" if tower == "clip" else "siglip"
    vision_config = tiny_config(kind).vision_config.to_dict() | {"num_hidden_layers": num_layers}
    return tiny_config(kind, connector, vision_config=vision_config, **TOWERS[tower])


def full_tower(model, config, num_layers: int) -> torch.nn.Module:
    """The tower with all `num_layers`, sharing our weights for the layers we build (the rest are unused)."""
    torch.manual_seed(1)
    vision_config = type(config.vision_config)(**(config.vision_config.to_dict() | {"num_hidden_layers": num_layers}))
    tower = AutoModel.from_config(vision_config).eval()
    missing, unexpected = tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("encoder.layers.") for key in missing)
    return tower


def reference_features(config, tower, projector, pixel_values: torch.Tensor) -> torch.Tensor:
    """The connector computed on the full tuple of hidden states, as the original code does."""
    states = tower(pixel_values, output_hidden_states=True).hidden_states
    assert len(states) == tower.config.num_hidden_layers + 1

    def select(index: int) -> torch.Tensor:
        return states[index][:, 1:] if config.vision_feature_select_strategy == "default" else states[index]

    final = select(config.vision_feature_layer)
    kind = config.dense_connector_type
    if kind == "dci":
        means = [torch.stack([select(i) for i in group]).mean(0) for group in config.dense_connector_groups]
        fused = torch.cat([final, *means], dim=-1)
    elif kind == "sci":
        fused = torch.cat([final, *(select(i) for i in config.dense_connector_layers)], dim=-1)
    elif kind == "sti":
        stride = config.sti_pool_stride
        pooled = [
            F.avg_pool1d(select(i).transpose(1, 2), stride).transpose(1, 2) for i in config.dense_connector_layers
        ]
        fused = torch.cat([final, *pooled], dim=1)
    else:
        fused = final
    return projector(fused)


def pixels(config, batch: int = 2) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("tower", TOWERS)
def test_features_match_keep_all_hidden_states_with_fewer_layers(tower, connector):
    config = deep_config(tower, connector)
    model = tiny_model(config)
    layer_calls = []
    for index, layer in enumerate(encoder_layers(model.model.vision_tower)):
        layer.register_forward_hook(lambda module, args, output, index=index: layer_calls.append(index))
    pixel_values = pixels(config)
    with torch.no_grad():
        ours = torch.stack(model.get_image_features(pixel_values).pooler_output)
        reference_tower = full_tower(model, config, num_layers=6)
        expected = reference_features(config, reference_tower, model.model.connector.projector, pixel_values)
    assert ours.shape == expected.shape == (2, config.num_image_tokens(), config.text_config.hidden_size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

    # Hidden state i is the output of layer i: F = hs[-2] needs every layer but the last, and no connector reads
    # deeper than F here; each needed layer runs once, in order, and the config counts just those.
    skips_last = tower != "siglip-full"
    assert config.vision_config.num_hidden_layers == (5 if skips_last else 6)
    assert layer_calls == list(range(config.vision_config.num_hidden_layers))


@pytest.mark.parametrize("tower", ("clip", "siglip-skip-last"))
def test_dci_peak_memory_is_near_the_single_layer_path(tower):
    """On a deep, narrow tower (24 layers, like CLIP-L) the stored states dominate the layers' own activations, so
    keeping all 25 states (as `output_hidden_states=True` and the original do) shows: an implementation that kept
    them, or kept each group's states until averaging, would fail both bounds."""
    config = deep_config(tower, "dci", num_layers=24)
    model = tiny_model(config)
    single_layer = tiny_model(deep_config(tower, "none", num_layers=24))
    reference_tower, projector = full_tower(model, config, num_layers=24), model.model.connector.projector
    pixel_values = pixels(config, batch=4)
    with torch.no_grad():
        ours = peak_bytes(lambda: model.get_image_features(pixel_values), "cpu")
        final_only = peak_bytes(lambda: single_layer.get_image_features(pixel_values), "cpu")
        keep_all = peak_bytes(lambda: reference_features(config, reference_tower, projector, pixel_values), "cpu")
    state_bytes = pixel_values.shape[0] * (config.patches_per_side**2 + 1) * config.vision_config.hidden_size * 4
    assert keep_all > 25 * state_bytes  # the reference really holds every state
    assert ours < 0.5 * keep_all, (ours, keep_all)
    assert ours <= 1.3 * final_only, (ours, final_only)
