"""load_pruned and apt-export under abuse: broken sidecars, unknown versions, bad weights, dtype strings,
files that are not checkpoints, an existing output, and the temporary folder of a killed export."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, logits, tiny_batch, tiny_model
from safetensors.torch import load_file, save_file

from apt_lightning import export
from apt_lightning.export import SIDECAR, ExportFormatError, export_pruned, load_pruned, main
from apt_lightning.files import make_temp_dir


@pytest.fixture
def exported(tmp_path):
    model = tiny_model("bert", seed=11)
    return export_pruned(model, tmp_path / "model"), model


def _sidecar(folder: Path) -> dict:
    return json.loads((folder / SIDECAR).read_text())


# ---------------------------------------------------------------- the sidecar
@pytest.mark.parametrize(
    "text, why",
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ('{"format_version": 2, "model_cl', "is not valid JSON"),
        ("[1, 2]", "holds a list"),
        ('{"format_version": 2, "model_class": "BertForSequenceClassification"}', "has no 'shapes'"),
        ('{"format_version": 2, "shapes": {}}', "has no 'model_class'"),
        ('{"format_version": 2, "model_class": "BertModel", "shapes": [1]}', "'shapes' is a list"),
    ],
)
def test_broken_sidecar_names_folder_file_and_problem(exported, text, why):
    folder, _ = exported
    (folder / SIDECAR).write_text(text)
    with pytest.raises(ExportFormatError) as err:
        load_pruned(folder)
    assert str(folder) in str(err.value) and SIDECAR in str(err.value) and why in str(err.value)


def test_truncated_sidecar(exported):
    folder, _ = exported
    text = (folder / SIDECAR).read_text()
    (folder / SIDECAR).write_text(text[: len(text) // 2])
    with pytest.raises(ExportFormatError, match=r"apt_shapes.json is not valid JSON \(truncated"):
        load_pruned(folder)


def test_shapes_with_missing_or_unknown_keys(exported):
    folder, _ = exported
    sidecar = _sidecar(folder)
    del sidecar["shapes"]["hidden"]
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(ExportFormatError, match="'shapes' is not valid: .*hidden"):
        load_pruned(folder)


@pytest.mark.parametrize("version", [3, 99, "2", None, 0])
def test_unknown_format_versions_are_refused(exported, version):
    folder, _ = exported
    sidecar = _sidecar(folder)
    if version is None:
        del sidecar["format_version"]
    else:
        sidecar["format_version"] = version
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(ExportFormatError, match="this install of apt-lightning reads versions 1, 2") as err:
        load_pruned(folder)
    assert str(folder) in str(err.value)
    assert ("newer apt-lightning" in str(err.value)) == (version in (3, 99))


def test_format_1_without_costs_still_loads(exported):
    folder, model = exported
    sidecar = _sidecar(folder)
    sidecar["format_version"] = 1
    for key in ("costs", "kv_groups", "full_kv_groups"):
        del sidecar["shapes"][key]
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    batch = tiny_batch(seed=11)
    torch.testing.assert_close(logits(load_pruned(folder), batch), logits(model, batch), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the weights
def _edit_weights(folder: Path, edit) -> str:
    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in state if k.endswith("layer.1.attention.self.query.weight"))
    state[name] = edit(state[name])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return name


def test_int8_weights_are_refused(exported):
    folder, _ = exported
    name = _edit_weights(folder, lambda w: (w * 100).to(torch.int8))
    with pytest.raises(ExportFormatError, match=f"tensor {name} is torch.int8, not floating point"):
        load_pruned(folder)


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_weights_are_refused(exported, bad, kind):
    folder, _ = exported

    def poison(w):
        w = w.clone()
        w[0, :3] = bad
        return w

    name = _edit_weights(folder, poison)
    with pytest.raises(ExportFormatError, match=f"tensor {name} holds 3 non-finite value\\(s\\) \\({kind}"):
        load_pruned(folder)


def test_truncated_weights(exported):
    folder, _ = exported
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ExportFormatError, match="model.safetensors cannot be read"):
        load_pruned(folder)


# ---------------------------------------------------------------- dtype
@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("FP16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64),
    ],
)
def test_dtype_strings_and_dtypes(exported, dtype, expected):
    folder, _ = exported
    assert next(load_pruned(folder, dtype=dtype).parameters()).dtype == expected


@pytest.mark.parametrize("dtype", ["int8", "float8", "cuda", torch.int8, 16])
def test_bad_dtypes_name_the_allowed_ones(exported, dtype):
    folder, _ = exported
    with pytest.raises(ValueError, match="not supported; .*float32, fp32, float16, fp16, bfloat16, bf16"):
        load_pruned(folder, dtype=dtype)


# ---------------------------------------------------------------- apt-export on bad input
@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "is empty"),
        (b"this is not a checkpoint\n", "is not a readable PyTorch checkpoint"),
        (None, "is not a Lightning checkpoint written by apt-fit: no hyper_parameters or state_dict"),
    ],
)
def test_apt_export_on_a_file_that_is_no_checkpoint(tmp_path, capsys, content, why):
    ckpt = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main([str(ckpt), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and why in err
    assert not (tmp_path / "out").exists()


def test_apt_export_truncated_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-2000])
    with pytest.raises(SystemExit):
        main([str(ckpt), str(tmp_path / "out")])
    assert f"{ckpt} is not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_apt_export_refuses_an_existing_output_before_loading(tmp_path, monkeypatch):
    ckpt = tmp_path / "any.ckpt"
    ckpt.write_bytes(b"x")
    (tmp_path / "out").mkdir()

    def never(path):
        raise AssertionError("the checkpoint was loaded before the output folder was checked")

    monkeypatch.setattr(export, "module_from_checkpoint", never)
    with pytest.raises(FileExistsError, match="out exists; pass overwrite=True \\(--overwrite\\)"):
        main([str(ckpt), str(tmp_path / "out")])


# ---------------------------------------------------------------- a killed export
KILLED_EXPORT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from conftest import tiny_model
from apt_lightning.export import export_pruned
model = tiny_model("bert", seed=1)
cls, save = type(model), type(model).save_pretrained
def slow_save(self, folder, **kw):
    save(self, folder, **kw)
    print("SAVED", flush=True)
    time.sleep(120)
cls.save_pretrained = slow_save
export_pruned(model, sys.argv[1])
"""


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_export(tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, str(parent / "killed"), str(REPO / "tests")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "SAVED"  # EOF (the child failed) ends the wait too
        leftover = _hidden(parent)
        assert len(leftover) == 1 and leftover[0].startswith(".killed.")
        assert f".{proc.pid}." in leftover[0]  # the temporary name carries the pid of its writer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # a live writer's folder (our own parent process's pid) and unrelated hidden folders are left alone
    live = make_temp_dir(parent / "busy")
    live = live.rename(parent / live.name.replace(f".{os.getpid()}.", f".{os.getppid()}."))
    (parent / ".keep").mkdir()
    export_pruned(tiny_model("bert", seed=2), parent / "next")
    assert _hidden(parent) == sorted([".keep", live.name])
    assert not (parent / "killed").exists() and (parent / "next" / SIDECAR).is_file()
