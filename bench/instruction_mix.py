"""A synthetic instruction mix with the long-tailed lengths of LLaVA-1.5's 665K stage-2 data, already tokenised.

The distribution (seeded; `records(n)`):

- 1 record in 4 is text-only (ShareGPT-like): 1 to 3 turns, 20 to 700 words in all (log-uniform), 1.3 tokens a word,
  30% of each turn's words in the question, 70% in the answer.
- The others have one image (`image_tokens` placeholders, 576 for CLIP-L/336) and a 35-token first question, then
  short answers (50%: VQA-style, 1 to 3 rounds of a 12-token question and a 1-5 token answer), a conversation (30%:
  2 to 4 rounds, answers of 20 to 80 words) or a detailed description (20%: one answer of 80 to 250 words).
- Every turn adds 8 tokens of role markers; a record starts with BOS. Labels are the answers' tokens (and their
  end-of-turn token), everything else `IGNORE_INDEX`, as the collator masks them.

Records are `(input_ids, labels, pixels)` as `DenseConnectorDataCollator.encode` returns them, so the collator's own
`collate` makes the padded or padding-free batches.
"""

import random

import torch

from dense_connector.training import IGNORE_INDEX


TOKENS_PER_WORD = 1.3
ROLE_TOKENS = 8


def turns_of(rng: random.Random, has_image: bool) -> list[tuple[int, int]]:
    """(question tokens, answer tokens) of each round of one record."""
    if not has_image:
        rounds = rng.randint(1, 3)
        words = 20 * (700 / 20) ** rng.random()
        per_round = words * TOKENS_PER_WORD / rounds
        return [(max(1, round(0.3 * per_round)), max(1, round(0.7 * per_round))) for _ in range(rounds)]
    kind = rng.random()
    if kind < 0.5:
        return [(35 if i == 0 else 12, rng.randint(1, 5)) for i in range(rng.randint(1, 3))]
    if kind < 0.8:
        return [(35 if i == 0 else 12, round(rng.randint(20, 80) * TOKENS_PER_WORD)) for i in range(rng.randint(2, 4))]
    return [(35, round(rng.randint(80, 250) * TOKENS_PER_WORD))]


def record(rng: random.Random, generator: torch.Generator, config, has_image: bool) -> tuple[list, list, dict]:
    vocab = config.text_config.vocab_size
    ids, labels = [1], [IGNORE_INDEX]  # BOS
    for index, (question, answer) in enumerate(turns_of(rng, has_image)):
        prompt = torch.randint(3, vocab - 2, (question + ROLE_TOKENS,), generator=generator).tolist()
        if has_image and index == 0:
            prompt = [config.image_token_id] * config.num_image_tokens() + prompt
        reply = torch.randint(3, vocab - 2, (answer + 1,), generator=generator).tolist()  # + end of turn
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    pixels = {}
    if has_image:
        size = config.vision_config.image_size
        pixels["pixel_values"] = torch.randn(1, 3, size, size, generator=generator)
    return ids, labels, pixels


def records(count: int, config, seed: int = 0) -> list[tuple[list[int], list[int], dict]]:
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    return [record(rng, generator, config, has_image=index % 4 != 0) for index in range(count)]
