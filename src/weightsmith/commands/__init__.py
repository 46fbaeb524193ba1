"""Commands as plain functions: one module per command group, each with its config
dataclass(es) and a `run_*(cfg, progress=None)` that returns plain data and prints nothing.

Every command can be called from Python without argparse:

    from weightsmith.commands import store
    store.run_info(store.InfoConfig(model="smollm2-135m-instruct"))

Modules: `loading` (the options every model-loading command shares), `store` (pull, models,
rm, info), `run` (generate, and the chat session `chat` drives), `train` (finetune, merge),
`eval`, `audit` (audit bias), `redteam`, `guard` (guard check, guard test), `export`,
`quantize`, `serve`, `demo`.

Not here: argument parsing, progress bars, result printers and exit codes (`weightsmith.cli`),
and the work itself (the stage packages: train, eval, safety, serve, quant, checkpoint).
"""
