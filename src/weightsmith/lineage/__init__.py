"""Lineage: every artifact weightsmith writes says where it came from, and the chain can be checked.

An artifact is a folder a command writes (a training run, a merged or quantized model, an
eval, red-team or audit report, a watchdog run) or a single file with companions (a GGUF
export and its Modelfile, an arena export's pairs). Beside it sits its record, `lineage.json`
in the folder or `NAME.lineage.json` beside the file: an id, the command and its config, the
inputs with their sha256 and the ids of the records that produced them, the outputs with
their sha256, the weightsmith version and git commit, torch and the device, start and end
time, and the headline metrics.

A new kind of artifact wires in with one call once its files are complete::

    from weightsmith.lineage import write_lineage

    started = time.time()
    ...  # write everything into OUT
    write_lineage(OUT, kind="synth", config=cfg, started=started, device=cfg.device,
                  inputs={"model": cfg.model, "seeds": cfg.seeds}, metrics={"rows": n})

`kind` is the command's name; if `weightsmith reproduce` should re-run it, add it to
`weightsmith.commands.reproduce.RECIPES` (its config class, run function and out field).

`check_lineage(path)` reads the tree back (tree.py); `weightsmith lineage` prints it.
Not here: printing (cli/lineage.py), model cards (report/card.py), re-running (commands/reproduce.py).
"""

from weightsmith.lineage.hashing import file_sha256, tree_digest
from weightsmith.lineage.record import (
    LINEAGE_FILE,
    SCHEMA,
    expected_hash,
    find_parent,
    lineage_file,
    note_command_line,
    write_lineage,
)
from weightsmith.lineage.tree import LineageError, check_lineage, locate, read_record

__all__ = [
    "LINEAGE_FILE",
    "SCHEMA",
    "LineageError",
    "check_lineage",
    "expected_hash",
    "file_sha256",
    "find_parent",
    "lineage_file",
    "locate",
    "note_command_line",
    "read_record",
    "tree_digest",
    "write_lineage",
]
