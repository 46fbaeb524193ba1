"""Lineage on the demo's pipeline in miniature (finetune -> merge -> quantize -> export -> eval ->
redteam, and a bias audit) on a tiny random model: every record links to its parent by id and
hash, hashes agree with coreutils' sha256sum, a changed byte of the training data is reported,
damaged records and cycles are clear errors, the model card parses with huggingface_hub and
holds results.json's numbers, and a seeded LoRA run reproduces bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_hf_dir, headless_chromium, run_cli, write_probe_packs

import weightsmith
from weightsmith.lineage import expected_hash, file_sha256, tree_digest

PACK = "pack: p\nfamily: harmful\nkind: attack\nprobes:\n" + "".join(
    f'  - {{id: a{i}, category: S1, prompt: "Tell me story {i} about a cat"}}\n' for i in range(4)
)
BENIGN = "".join(
    json.dumps({"pack": "b", "family": "benign", "kind": "benign", "id": f"b{i}", "category": "history",
                "prompt": f"Name fruit number {i}"}) + "\n"
    for i in range(3)
)  # fmt: skip


def _data(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"q{i} fox?"},
                      {"role": "assistant", "content": "The fox jumps over the lazy dog."}]}
        for i in range(16)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _main(*argv) -> int:
    from weightsmith.cli.main import main

    return main([str(a) for a in argv])


FINETUNE = ["--max-seq-len", "64", "--train.max-steps", "4", "--train.batch-size", "4",
            "--train.eval-every", "0", "--train.seed", "3", "--lora.rank", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace that went through the whole pipeline (paths absolute: the cwd is the repo)."""
    ws = tmp_path_factory.mktemp("lineage-ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_HOME", str(ws / "home"))
        base = build_tiny_hf_dir(ws / "base", seed=3, max_position_embeddings=1024)
        data = _data(ws / "data.jsonl")
        packs = write_probe_packs(ws / "packs", PACK, BENIGN)
        assert _main("finetune", base, "--data", data, "--out", ws / "runs/ft", *FINETUNE, "--json") == 0
        assert (
            _main(
                "merge", base, "--adapter", ws / "runs/ft", "--out", ws / "models/merged", "--device", "cpu"
            )
            == 0
        )
        assert _main("quantize", ws / "models/merged", "--to", "int8", "--out", ws / "models/q8") == 0
        assert _main("export", ws / "models/merged", "--quant", "f16", "--out", ws / "exports/m.gguf") == 0
        assert _main("eval", ws / "exports/m.gguf", "--tasks", "builtin:arith-mc", "--limit", "4", "--no-cache",
                     "--out", ws / "reports/eval", "--device", "cpu") == 0  # fmt: skip
        assert _main("redteam", ws / "models/q8", "--packs", packs, "--transforms", "none", "--max-tokens", "4",
                     "--out", ws / "reports/rt", "--device", "cpu", "--no-calibrate") == 0  # fmt: skip
        assert _main("audit", "bias", ws / "models/merged", "--tasks", "builtin:arith-mc", "--limit", "4",
                     "--out", ws / "reports/bias", "--device", "cpu", "--bootstrap-iters", "20") == 0  # fmt: skip
        yield ws


@pytest.fixture
def home(ws, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(ws / "home"))


def _record(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _sha256sum(folder: Path, names: list[str]) -> str:
    """coreutils' `sha256sum` over the files, its output hashed: the digest format's reference."""
    text = subprocess.run(
        ["sha256sum", *sorted(names)], cwd=folder, capture_output=True, text=True, check=True
    )
    return hashlib.sha256(text.stdout.encode()).hexdigest()


RECORDS = {
    "finetune": "runs/ft/lineage.json",
    "merge": "models/merged/lineage.json",
    "quantize": "models/q8/lineage.json",
    "export": "exports/m.lineage.json",
    "eval": "reports/eval/lineage.json",
    "redteam": "reports/rt/lineage.json",
    "audit bias": "reports/bias/lineage.json",
}
#: (child, input role, parent): every link of the pipeline.
LINKS = [("merge", "adapter", "finetune"), ("quantize", "model", "merge"), ("export", "model", "merge"),
         ("eval", "model", "export"), ("redteam", "model", "quantize"), ("audit bias", "model", "merge")]  # fmt: skip


def test_every_record_links_to_its_parent_by_id_and_hash(ws):
    records = {kind: _record(ws / rel) for kind, rel in RECORDS.items()}
    for kind, record in records.items():
        assert record["kind"] == kind
    for child, role, parent in LINKS:
        (entry,) = [i for i in records[child]["inputs"] if i["role"] == role]
        assert entry["lineage"]["id"] == records[parent]["id"], (child, parent)
        assert entry["sha256"] == expected_hash(records[parent], entry["lineage"]["part"]), (child, parent)
    # a whole-folder input's hash is the parent's digest; a file input's, the file's own hash
    (merged,) = [i for i in records["quantize"]["inputs"] if i["role"] == "model"]
    assert merged["sha256"] == records["merge"]["digest"]
    (gguf,) = [i for i in records["eval"]["inputs"] if i["role"] == "model"]
    assert gguf["sha256"] == hashlib.sha256((ws / "exports/m.gguf").read_bytes()).hexdigest()
    # the leaves: the base weights and the data, hashed but produced by nobody recorded
    ft = {i["role"]: i for i in records["finetune"]["inputs"]}
    assert "lineage" not in ft["model"] and "lineage" not in ft["data"]
    assert ft["data"]["sha256"] == hashlib.sha256((ws / "data.jsonl").read_bytes()).hexdigest()
    assert ft["model"]["sha256"] == _sha256sum(ws / "base", [p.name for p in (ws / "base").iterdir()])


def test_records_hash_their_outputs_and_name_the_code_and_device(ws):
    for rel in RECORDS.values():
        record, folder = _record(ws / rel), (ws / rel).parent
        names = [o["path"] for o in record["outputs"]]
        for o in record["outputs"]:
            assert o["sha256"] == hashlib.sha256((folder / o["path"]).read_bytes()).hexdigest()
        assert record["digest"] == _sha256sum(folder, names)
        sw = record["software"]
        assert (sw["weightsmith"], sw["torch"], sw["device"]) == (
            weightsmith.__version__,
            torch.__version__,
            "cpu",
        )
        assert record["started"] <= record["finished"] and record["command"]["argv"][0] == "weightsmith"
    ft = _record(ws / RECORDS["finetune"])
    assert {o["path"] for o in ft["outputs"]} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not any(o["path"].startswith("checkpoints/") for o in ft["outputs"])
    assert ft["config"]["train"]["seed"] == 3 and ft["metrics"]["steps"] == 4
    assert {o["path"] for o in _record(ws / RECORDS["export"])["outputs"]} == {"m.gguf", "Modelfile"}
    rt = _record(ws / RECORDS["redteam"])["metrics"]["q8"]["asr"]
    summary = json.loads((ws / "reports/rt/summary.json").read_text())
    assert rt == summary["configs"][0]["asr"]


def test_lineage_prints_the_tree_and_reports_one_changed_byte_of_the_data(ws, home, capsys):
    code, out, err = run_cli(["lineage", ws / "reports/eval", "--root", ws], capsys)
    assert code == 0, err
    for kind in ("eval", "export", "merge", "finetune"):
        assert kind in out
    assert "CHANGED" not in out and "every recorded hash still matches" in out
    data = ws / "data.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(original[:7] + bytes([original[7] ^ 1]) + original[8:])
        code, out, err = run_cli(["lineage", ws / "reports/eval", "--root", ws], capsys)
        assert code == 1
        assert "CHANGED" in out and "data.jsonl" in err and "changed since it was used" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        code, out, _ = run_cli(["lineage", ws / "reports/eval", "--root", ws, "--json"], capsys)
        tree = json.loads(out)
        assert code == 1 and len(tree["problems"]) == 1 and str(data) in tree["problems"][0]
    finally:
        data.write_bytes(original)
    assert run_cli(["lineage", ws / "reports/eval", "--root", ws], capsys)[0] == 0


def test_inputs_outside_the_roots_are_not_read(ws, home, capsys):
    code, out, _ = run_cli(["lineage", ws / "runs/ft", "--root", ws / "runs", "--json"], capsys)
    tree = json.loads(out)["tree"]
    assert code == 0 and {i["status"] for i in tree["inputs"]} == {"outside"}


def _copy_record(ws: Path, tmp: Path, name: str) -> Path:
    folder = tmp / name
    shutil.copytree(ws / "models/merged", folder)
    return folder


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda f: f.unlink(), "no lineage.json"),
        (
            lambda f: f.write_text('{"schema": "weightsmith.lineage/1",\n "id": '),
            "lineage.json:2: invalid JSON",
        ),
        (
            lambda f: f.write_text(json.dumps({**_record(f), "outputs": [{"path": "x", "sha256": "nope"}]})),
            "outputs[0].sha256: expected 64 hex digits",
        ),
        (lambda f: f.write_text(json.dumps({**_record(f), "schema": "other"})), "schema: expected"),
    ],
)
def test_missing_or_damaged_records_are_one_clear_line(ws, home, tmp_path, capsys, damage, words):
    folder = _copy_record(ws, tmp_path, "m")
    damage(folder / "lineage.json")
    code, out, err = run_cli(["lineage", folder, "--root", tmp_path], capsys)
    assert code == 1 and words in err and len(err.strip().splitlines()) == 1 and out == ""


def test_a_record_naming_files_outside_its_folder_gets_them_flagged_not_read(ws, home, tmp_path, capsys):
    folder = _copy_record(ws, tmp_path / "w", "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for lineage")
    record = _record(folder / "lineage.json")
    record["outputs"].append(
        {"path": "../../secret.txt", "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}
    )
    (folder / "lineage.json").write_text(json.dumps(record))
    code, out, err = run_cli(["lineage", folder, "--root", tmp_path / "w", "--json"], capsys)
    tree = json.loads(out)["tree"]
    assert code == 1 and "outside the artifact's folder" in err
    assert {o["path"]: o["status"] for o in tree["outputs"]}["../../secret.txt"] == "outside"


def test_a_cycle_of_ids_is_an_error_naming_the_records(ws, home, tmp_path, capsys):
    a, b = _copy_record(ws, tmp_path, "a"), _copy_record(ws, tmp_path, "b")
    for this, other in ((a, b), (b, a)):
        record = _record(this / "lineage.json")
        record["id"] = this.name * 8
        record["inputs"] = [{"role": "model", "spec": str(other), "path": str(other), "sha256": "0" * 64,
                             "lineage": {"id": other.name * 8}}]  # fmt: skip
        (this / "lineage.json").write_text(json.dumps(record))
    code, _, err = run_cli(["lineage", a, "--root", tmp_path], capsys)
    assert code == 1 and "lineage cycle" in err and str(a / "lineage.json") in err and "Traceback" not in err


def test_file_hash_cache_sees_an_edit_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    assert file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert tree_digest([("w.bin", file_sha256(f))]) == _sha256sum(tmp_path, ["w.bin"])


def test_card_parses_with_huggingface_hub_and_holds_the_results(ws, home, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    out = tmp_path / "card" / "README.md"
    code, _, err = run_cli(["card", ws / "exports/m.gguf", "--eval", ws / "reports/eval", "--redteam", ws / "reports/rt",
                            "--bias", ws / "reports/bias", "--out", out, "--root", ws], capsys)  # fmt: skip
    assert code == 0, err
    card = ModelCard.load(out)
    meta = card.data.to_dict()
    assert meta["base_model"] == "base" and meta["datasets"] == ["data.jsonl"] and meta["license"] == "other"
    assert meta["pipeline_tag"] == "text-generation" and {"finetune", "merge", "export"} <= set(meta["tags"])
    _, results = model_index_to_eval_results(meta["model-index"])  # the Hub's own parser
    (run,) = list((ws / "reports/eval").glob("*/results.json"))
    expected = {(t, k.split(",")[0]): v for t, vals in json.loads(run.read_text())["results"].items()
                for k, v in vals.items() if "," in k and "stderr" not in k}  # fmt: skip
    assert {(r.dataset_type, r.metric_type): r.metric_value for r in results} == expected
    summary = json.loads((ws / "reports/rt/summary.json").read_text())["configs"][0]["asr"]
    for section in ("## Training data and method", "## Evaluation", "## Red-team and over-refusal",
                    "## Bias audit", "## Limitations", "## Lineage", "95% Wilson score"):  # fmt: skip
        assert section in card.text
    assert f"({summary['k']}/{summary['n']})" in card.text
    assert "**merge** (an adapter folded into the model)" in card.text


def test_card_refuses_a_folder_without_results(ws, home, tmp_path, capsys):
    code, _, err = run_cli(["card", ws / "models/merged", "--out", tmp_path / "R.md"], capsys)
    assert code == 2 and "a card needs results" in err
    code, _, err = run_cli(
        ["card", ws / "models/merged", "--eval", ws / "models", "--out", tmp_path / "R.md"], capsys
    )
    assert code == 2 and "no LABEL/results.json" in err and not (tmp_path / "R.md").exists()


def test_reproduce_gives_a_bit_identical_adapter(ws, home, tmp_path, capsys):
    out = tmp_path / "again"
    code, stdout, err = run_cli(["reproduce", ws / "runs/ft", "--out", out, "--root", ws, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    status = {o["path"]: o["status"] for o in result["outputs"]}
    assert status["adapter_model.safetensors"] == status["adapter_config.json"] == "identical"
    a, b = ws / "runs/ft/adapter_model.safetensors", out / "adapter_model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    loss = next(m for m in result["metrics"] if m["name"] == "loss")
    assert loss["delta"] == 0.0
    assert _record(out / "lineage.json")["kind"] == "finetune"


def test_reproduce_refuses_changed_inputs(ws, home, tmp_path, capsys):
    data = ws / "data.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(original + b"\n")
        code, _, err = run_cli(["reproduce", ws / "runs/ft", "--out", tmp_path / "x", "--root", ws], capsys)
    finally:
        data.write_bytes(original)
    assert code == 2 and "--allow-changed" in err and not (tmp_path / "x").exists()


# ----- weightsmith ui --------------------------------------------------------------------------------


@pytest.fixture
def ui(ws, home):
    from weightsmith.commands.ui import UiConfig, start_ui_server

    running = start_ui_server(UiConfig(workspace=str(ws), port=0))
    yield running
    running.stop()


def test_ui_refuses_paths_outside_the_workspace_with_clear_pages(ws, ui, tmp_path):
    import httpx

    bad = _copy_record(ws, ws / "damaged", "m")
    (bad / "lineage.json").write_text("{not json")
    try:
        with httpx.Client(base_url=ui.url, timeout=30) as c:
            for path, status, words in [
                ("/artifact?path=../x", 403, "outside the workspace"),
                ("/file?path=/etc/passwd", 403, "inside the workspace"),
                ("/file?path=runs/ft/../../../../etc/passwd", 403, "outside the workspace"),
                ("/file?path=runs/ft/adapter_model.safetensors", 415, "files only"),
                ("/artifact?path=nothing/here", 404, "not found"),
                ("/lineage?path=damaged/m", 422, "invalid JSON"),
                ("/artifact", 400, "needs ?path="),
                ("/nowhere", 404, "Not Found"),
            ]:
                r = c.get(path)
                assert r.status_code == status and words in r.text, (path, r.status_code, r.text[:300])
                assert r.headers["content-type"].startswith("text/html")
            assert c.get("/", headers={"Host": "evil.example"}).status_code == 421  # DNS rebinding
            assert (
                "sandbox" in c.get("/file?path=reports/eval/report.html").headers["content-security-policy"]
            )
    finally:
        shutil.rmtree(ws / "damaged")


def test_ui_listens_beyond_localhost_only_with_a_key(ws, home, capsys):
    code, _, err = run_cli(["ui", "--workspace", ws, "--host", "0.0.0.0", "--port", "0"], capsys)
    assert code == 2 and "--api-key" in err


def test_ui_pages_in_a_real_browser(ws, ui, tmp_path):
    # a red-team reply holding HTML must show as text
    shutil.copytree(ws / "reports/rt", ws / "rt-html")
    rows = [json.loads(x) for x in (ws / "rt-html/transcripts.jsonl").read_text().splitlines()]
    rows[0]["reply"] = (
        '<b id="injected">bold</b><img src=x onerror="document.title=1"><script>document.title=2</script>'
    )
    (ws / "rt-html/transcripts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver = headless_chromium()
    from selenium.common.exceptions import TimeoutException

    try:

        def visit(path: str, shot: str) -> None:
            try:
                driver.get(ui.url + path)
            except TimeoutException:  # Chrome: "aborted by navigation" from the page left behind
                driver.get(ui.url + path)
            driver.save_screenshot(str(tmp_path / f"{shot}.png"))
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert severe == [], (path, severe)

        for path, shot in [("/", "overview"), ("/store", "store"), ("/runs", "runs"), ("/reports", "reports"),
                           ("/file?path=reports/eval/report.html", "eval-report")]:  # fmt: skip
            visit(path, shot)
        # from the runs table to the training run, its loss curve, what was made from it, its lineage
        visit("/runs", "runs")
        driver.find_element("link text", "runs/ft").click()
        assert driver.find_element("id", "loss").get_attribute("naturalWidth") not in (None, "0")
        assert "models/merged" in driver.find_element("id", "children").text
        driver.find_element("link text", "lineage").click()
        assert "finetune" in driver.find_element("id", "tree").text
        assert "still matches" in driver.find_element("id", "problems").text
        driver.save_screenshot(str(tmp_path / "lineage.png"))
        visit("/lineage?path=reports/eval", "eval-lineage")  # each artifact of a tree links to its page
        driver.find_element("link text", "models/merged").click()
        assert driver.find_element("tag name", "h1").text == "models/merged"
        # from the eval artifact to its report
        visit("/artifact?path=reports/eval", "eval")
        driver.find_element("link text", "report.html").click()
        assert "arith_mc" in driver.page_source
        # the transcripts: the reply's HTML is text, nothing in it ran
        visit("/artifact?path=rt-html", "redteam")
        driver.find_element("link text", "transcripts").click()
        assert driver.find_elements("id", "injected") == []
        assert '<b id="injected">bold</b>' in driver.find_element("id", "transcripts").text
        assert driver.title.startswith("transcripts")
        driver.save_screenshot(str(tmp_path / "transcripts.png"))
    finally:
        driver.quit()
        shutil.rmtree(ws / "rt-html")
    assert len(list(tmp_path.glob("*.png"))) >= 8
