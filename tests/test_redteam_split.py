"""The stable train / held-out split of red-team probes: the sha256 definition computed here by
hand, disjoint sides that cover every probe, transforms that never straddle, and the
command's flags (--split, --heldout-fraction, --limit after the split)."""

from __future__ import annotations

import hashlib

import pytest

from weightsmith.errors import UsageError
from weightsmith.safety.probes import load_packs
from weightsmith.safety.split import SplitOptions, probe_side, select_split, side_of
from weightsmith.safety.transforms import apply_transforms, parse_transforms


def by_hand(pack: str, probe_id: str, fraction: float) -> str:
    """The documented definition: the first 64 bits of sha256(salt NUL pack NUL id) as a
    fraction of 2**64, held out when below the held-out share."""
    digest = hashlib.sha256(b"weightsmith-redteam-split-v1\x00" + pack.encode() + b"\x00" + probe_id.encode())
    u = int.from_bytes(digest.digest()[:8], "big") / 2**64
    return "heldout" if u < fraction else "train"


IDS = [("harmful", "s1-001"), ("harmful", "s11-002"), ("benign", "homonym-001"), ("benign", "b-001"),
       ("injection", "email-01"), ("my-pack", "a1"), ("my-pack", "a4"), ("my-pack", "7")]  # fmt: skip
#: A few sides pinned, so that a changed salt or definition shows up as a failure here (each
#: also equals `by_hand`, checked below).
PINNED = {("harmful", "s1-001"): "train", ("benign", "b-001"): "heldout", ("my-pack", "a4"): "heldout",
          ("my-pack", "a1"): "train"}  # fmt: skip


def test_sides_follow_the_sha256_definition():
    for fraction in (0.1, 0.3, 0.5, 0.9):
        assert [side_of(p, i, fraction) for p, i in IDS] == [by_hand(p, i, fraction) for p, i in IDS]
    # the hand-chosen ids land on both sides at the default share (the test can fail both ways)
    assert {by_hand(p, i, 0.3) for p, i in IDS} == {"train", "heldout"}
    assert {k: by_hand(*k, 0.3) for k in PINNED} == PINNED == {k: side_of(*k) for k in PINNED}
    # the pack is part of the identity: the same local id in two packs is hashed apart
    packs = [f"pack{k}" for k in range(40)]
    assert len({side_of(p, "a1", 0.5) for p in packs}) == 2


@pytest.fixture(scope="module")
def builtin():
    return load_packs(["builtin:all"])


def test_sides_are_disjoint_cover_everything_and_grow_monotonically(builtin):
    train = select_split(builtin, "train", 0.3)
    held = select_split(builtin, "heldout", 0.3)
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert sorted(p.id for p in train + held) == sorted(p.id for p in builtin)
    assert select_split(builtin, "all", 0.3) == builtin
    share = len(held) / len(builtin)
    assert 0.2 < share < 0.4, share
    # benign probes are split too, and both sides keep some of them
    assert any(p.kind == "benign" for p in held) and any(p.kind == "benign" for p in train)
    # raising the share only moves probes from train to held-out
    more = {p.id for p in select_split(builtin, "heldout", 0.5)}
    assert {p.id for p in held} <= more
    # each side is the hand definition applied to the pack and the id in the pack
    assert all(by_hand(p.pack, p.id.split("/", 1)[1], 0.3) == "heldout" for p in held)


def test_transforms_of_one_probe_never_straddle(builtin):
    transforms = parse_transforms(["none", "base64", "rot13", "template:fiction+leetspeak", "suffix:sure"])
    transformed = apply_transforms(builtin, transforms)
    sides: dict[str, set[str]] = {}
    for p in transformed:
        sides.setdefault(p.id.split("~", 1)[0], set()).add(probe_side(p, 0.3))
    assert all(len(s) == 1 for s in sides.values())
    # splitting before or after the transforms picks the same attempts
    for side in ("train", "heldout"):
        after = [p.id for p in select_split(transformed, side, 0.3)]
        before = [p.id for p in apply_transforms(select_split(builtin, side, 0.3), transforms)]
        assert after == before
    # a transcript record (pack + full probe id) gets the same side as its probe
    p = transformed[3]
    assert probe_side({"pack": p.pack, "probe": p.id}, 0.3) == probe_side(p, 0.3)


def test_bad_split_options_are_one_line_errors():
    with pytest.raises(UsageError, match="--split must be one of train, heldout, all"):
        SplitOptions(split="test")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(UsageError, match="--heldout-fraction"):
            SplitOptions(heldout_fraction=bad)
    with pytest.raises(UsageError, match="--split"):
        select_split([], "held-out")


def _cli(argv, capsys):
    from weightsmith.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_split_flags(capsys):
    for argv, needle in (
        (["redteam", "nonexistent-model", "--split", "test"], "--split"),
        (["redteam", "nonexistent-model", "--heldout-fraction", "1"], "--heldout-fraction"),
    ):
        code, out, err = _cli(argv, capsys)
        assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err


def test_limit_applies_after_the_split():
    from weightsmith.commands.redteam import RedteamConfig, select_probes

    cfg = RedteamConfig(target="m", packs=["builtin:harmful"], transforms=["none", "rot13"], limit=5,
                        probe_split=SplitOptions(split="heldout"))  # fmt: skip
    loaded, probes = select_probes(cfg)
    assert len(loaded) == 42
    bases = {p.id.split("~", 1)[0] for p in probes}
    assert len(bases) == 5 and len(probes) == 10  # 5 held-out probes, each plain and in rot13
    assert all(by_hand("harmful", b.split("/", 1)[1], 0.3) == "heldout" for b in bases)


def test_a_split_that_leaves_no_probes_is_a_usage_error(tmp_path):
    from weightsmith.commands.redteam import RedteamConfig, select_probes

    assert by_hand("tiny-benign", "b1", 0.3) == "train"
    pack = tmp_path / "one.jsonl"
    pack.write_text(
        '{"pack": "tiny-benign", "family": "benign", "kind": "benign", "id": "b1", "prompt": "Hi"}\n'
    )
    cfg = RedteamConfig(target="m", packs=[str(pack)], probe_split=SplitOptions(split="heldout"))
    with pytest.raises(UsageError, match="--split heldout leaves no probes"):
        select_probes(cfg)
