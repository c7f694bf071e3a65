"""Jinja chat templates for the two conversation formats of the released Dense Connector checkpoints, and `plain`,
the original's stage-1 (pre-training) format of image captions.

`vicuna_v1` (the Vicuna-7B/13B checkpoints) and `llama_3` (the Llama-3-8B-Instruct checkpoint) render exactly the
prompts of the original conversation code, including its quirk that `llama_3` puts assistant turns under the
`system` header (the released model was trained that way). Images and videos in a message become the `<image>` /
`<video>` placeholder followed by a newline, at the start of that message, as the original places them.

Both write the tokenizer's BOS first, as the original's ids start with it (its `tokenizer_image_token` keeps the BOS
the tokenizer adds), so a chat rendered here and tokenised without special tokens, as chat consumers do (vLLM's chat
endpoint, TRL's collators), gives the original's ids; the processor adds no second BOS to text that already starts
as the template's does. `llama_3`'s original prompt itself begins with a literal `<|begin_of_text|>` after that BOS.
Assistant replies and their end-of-turn marker are wrapped in `{% generation %}` ... `{% endgeneration %}` (which
render nothing), from where the generation prompt ends, so `return_assistant_tokens_mask=True` (TRL's
`assistant_only_loss=True`) marks what `DenseConnectorDataCollator` labels. A new template follows the same pattern.

Messages may hold a plain string or transformers-style content items
(`[{"type": "image"}, {"type": "text", "text": "..."}]`); a leading `system` message replaces the default system
prompt.
"""

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

# Renders one message's content into `ns.text`: media placeholders first (in order), then the text items.
_RENDER_CONTENT = """
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- set ns = namespace(media="", text="") -%}
        {%- for item in content -%}
            {%- if item["type"] == "image" -%}
                {%- set ns.media = ns.media + "<image>\\n" -%}
            {%- elif item["type"] == "video" -%}
                {%- set ns.media = ns.media + "<video>\\n" -%}
            {%- elif item["type"] == "text" -%}
                {%- set ns.text = ns.text + item["text"] -%}
            {%- else -%}
                {{- raise_exception("Unsupported content type " + item["type"] + "; use image, video or text.") -}}
            {%- endif -%}
        {%- endfor -%}
        {{- ns.media + ns.text -}}
    {%- endif -%}
{%- endmacro -%}
"""

_SYSTEM_PROMPT = """
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set system_prompt = render(messages[0]["content"]) -%}
    {%- set messages = messages[1:] -%}
{%- else -%}
    {%- set system_prompt = DEFAULT -%}
{%- endif -%}
"""

_CHECK_ROLE = """
        {%- if message["role"] not in ("user", "assistant") -%}
            {{- raise_exception("Unsupported role " + message["role"] + "; only a first system message, then user "
                                "and assistant messages, are supported.") -}}
        {%- endif -%}
"""

VICUNA_V1 = (
    _RENDER_CONTENT
    + _SYSTEM_PROMPT.replace("DEFAULT", repr(VICUNA_V1_SYSTEM))
    + """
{{- bos_token if bos_token is defined else "" -}}
{{- system_prompt + " " -}}
{%- for message in messages -%}
"""
    + _CHECK_ROLE
    + """
    {%- if message["role"] == "user" -%}
        {{- "USER: " + render(message["content"]) + " " -}}
    {%- else -%}
        {{- "ASSISTANT:" -}}
        {%- generation -%}{{- " " + render(message["content"]) + "</s>" -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "ASSISTANT:" -}}
{%- endif -%}
"""
)

LLAMA_3 = (
    _RENDER_CONTENT
    + _SYSTEM_PROMPT.replace("DEFAULT", repr(LLAMA_3_SYSTEM))
    + """
{{- bos_token if bos_token is defined else "" -}}
{{- "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n" + system_prompt + "<|eot_id|>" -}}
{%- for message in messages -%}
"""
    + _CHECK_ROLE
    + """
    {%- if message["role"] == "user" -%}
        {{- "<|start_header_id|>user<|end_header_id|>\\n\\n" + render(message["content"]) + "<|eot_id|>" -}}
    {%- else -%}
        {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" -}}
        {%- generation -%}{{- render(message["content"]) + "<|eot_id|>" -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" -}}
{%- endif -%}
"""
)

# Stage-1 pre-training (`--version plain`): a user turn renders only its media placeholders (its text is dropped), an
# assistant turn its text and "\n", the original's `<image>` + caption + `"\n"`; no system prompt, no role markers.
PLAIN = (
    _RENDER_CONTENT
    + """
{{- bos_token if bos_token is defined else "" -}}
{%- for message in messages -%}
    {%- if message["role"] == "user" -%}
        {%- set text = render(message["content"]) -%}
        {{- "<image>" * text.count("<image>") + "<video>" * text.count("<video>") -}}
    {%- elif message["role"] == "assistant" -%}
        {%- generation -%}{{- render(message["content"]) + "\\n" -}}{%- endgeneration -%}
    {%- elif not (message["role"] == "system" and loop.first) -%}
        {{- raise_exception("Unsupported role " + message["role"] + "; plain takes user and assistant messages.") -}}
    {%- endif -%}
{%- endfor -%}
"""
)

CHAT_TEMPLATES: dict[str, str] = {"vicuna_v1": VICUNA_V1, "llama_3": LLAMA_3, "plain": PLAIN}

# Tokens at which the original stops generating, per conversation format (for `generation_config.eos_token_id`).
STOP_TOKENS: dict[str, list[str]] = {"vicuna_v1": ["</s>"], "llama_3": ["<|eot_id|>", "<|end_of_text|>"]}

# The original training scripts' `--version` names -> the template that renders them.
VERSION_TEMPLATES: dict[str, str] = {
    "plain": "plain",
    "v1": "vicuna_v1",
    "vicuna_v1": "vicuna_v1",
    "llama_3": "llama_3",
}


def stop_token_ids(tokenizer, conv_mode: str) -> list[int]:
    """Ids of `STOP_TOKENS[conv_mode]` in `tokenizer`, for `generation_config.eos_token_id`."""
    if conv_mode not in STOP_TOKENS:
        raise ValueError(f"Unknown conversation format {conv_mode!r}; expected one of {sorted(STOP_TOKENS)}.")
    vocab = tokenizer.get_vocab()
    missing = [token for token in STOP_TOKENS[conv_mode] if token not in vocab]
    if missing:
        raise ValueError(f"The tokenizer has no {missing} token(s), which the {conv_mode} format stops at.")
    return [vocab[token] for token in STOP_TOKENS[conv_mode]]


# Turns each message's content items into one string (placeholders first), then the model's own template runs.
_MEDIA_AS_TEXT = """
{%- set media_ns = namespace(messages=[]) -%}
{%- for message in messages -%}
    {%- if message["content"] is string -%}
        {%- set media_ns.messages = media_ns.messages + [message] -%}
    {%- else -%}
        {%- set media_ns.messages = media_ns.messages + [dict(message, content=render(message["content"]))] -%}
    {%- endif -%}
{%- endfor -%}
{%- set messages = media_ns.messages -%}
"""


def with_media_placeholders(chat_template: str) -> str:
    """A language model's own chat template (e.g. Qwen2's) that also takes image and video content items: each
    message's placeholders come first, each followed by a newline, as in the templates above. BOS and
    `{% generation %}` markers stay as that template has them (it decides whether a BOS is written)."""
    return _RENDER_CONTENT + _MEDIA_AS_TEXT + chat_template


__all__ = [
    "CHAT_TEMPLATES",
    "LLAMA_3_SYSTEM",
    "STOP_TOKENS",
    "VERSION_TEMPLATES",
    "VICUNA_V1_SYSTEM",
    "stop_token_ids",
]
