"""`fewshot` and `ablate` refuse bad input before they write anything (in-process CLI, no Ray)."""

from __future__ import annotations

from galaxalign_dist.cli.main import main


def test_fewshot_bad_fractions_leave_no_out_directory(tmp_path, capsys):
    out = tmp_path / "fresh" / "fewshot-out"
    code = main(["fewshot", "--out", str(out), "--fractions", "0,2", "--set", f"data.path={tmp_path}"])
    assert code == 2
    assert "fractions must be in (0, 1], got [0.0, 2.0]" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()  # no --out, not even its parent


def test_ablate_unknown_variant_leaves_no_out_directory(tmp_path, capsys):
    out = tmp_path / "ablate-out"
    code = main(["ablate", "--out", str(out), "--variants", "clip,v9", "--set", f"data.path={tmp_path}"])
    assert code == 2
    assert "unknown ablation variants ['v9']" in capsys.readouterr().err
    assert not out.exists()
