"""Serving Dense Connector checkpoints with vLLM, through vLLM's Transformers modeling backend.

vLLM serves a saved or converted checkpoint folder as it is, as remote code (`trust_remote_code=True`): the model and
processor carry the hooks its backend needs (`DenseConnectorProcessor._get_num_multimodal_tokens`,
`return_text_replacement_offsets=True`, `AutoModel` in the config's `auto_map`). This module adds what vLLM cannot do
by itself: `token_prompt` tokenises a prompt with the checkpoint's processor, exactly as the original code does (each
chunk between images on its own), and hands vLLM those ids with one placeholder per image, which vLLM expands again.
vLLM itself tokenises a text prompt whole: the tokenizers of converted checkpoints and of the demo give the same ids
that way (tested), but a tokenizer not written by this package may not.
"""

from collections.abc import Sequence

from PIL import Image


def token_prompt(processor, text: str, images: Sequence[Image.Image] = (), **kwargs) -> dict:
    """vLLM's token prompt (`{"prompt_token_ids": ..., "multi_modal_data": ...}`) for `text` with `images`.

    `text` holds one `<image>` per image (as from `processor.apply_chat_template`); `kwargs` go to the processor.
    vLLM expands each placeholder to the image's features again, so the engine sees exactly the processor's ids.
    """
    images = list(images)
    ids = processor(text=text, images=images or None, **kwargs)["input_ids"][0]
    sizes = [[image.height, image.width] for image in images]
    counts = iter(processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"] if images else ())
    prompt_ids, index = [], 0
    while index < len(ids):
        prompt_ids.append(ids[index])
        index += next(counts) if ids[index] == processor.image_token_id else 1
    prompt = {"prompt_token_ids": prompt_ids}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt


__all__ = ["token_prompt"]
