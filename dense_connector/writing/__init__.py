"""The checkpoint-writing engine that conversion, building and export share.

A client decides a config, a tokenizer and a plan of tensors (where each comes from, its name and dtype in the
written folder); this package streams the tensors into safetensors shards without holding a model in memory, writes
the processor, generation config, remote code and model card, checks that the folder loads completely and runs, and
moves it into place only then (`staging.staged_output`), leaving nothing behind on any failure.

Modules, each using only those listed after it: `staging`, `verify`, `folder`, `tokenizer`, `tensors`, `towers`,
`sources`.
"""
