"""`smoledge fidelity --text FILE` (repeatable) scores other texts and prints bits per weight beside KL."""

from __future__ import annotations

import json

from conftest import run_cli


def test_fidelity_scores_the_given_texts_and_reports_bits_per_weight(tiny_int4_bundle, tiny_fp32_bundle, tmp_path):
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("A short line of English to score.\nAnother line, scored on its own.\n")
    two.write_text("A third line from a second file.\n")
    out = tmp_path / "report.json"
    res = run_cli("fidelity", str(tiny_int4_bundle), "--reference", str(tiny_fp32_bundle),
                  "--text", str(one), "--text", str(two), "--json", str(out))
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["texts"] == [str(one), str(two)]
    assert report["end_to_end"]["positions"] > 0
    assert 4.0 <= report["text_bits_per_weight"] <= 9.0
    assert f"{report['text_bits_per_weight']:.2f} bits/weight" in res.stdout


def test_fidelity_with_a_missing_text_is_a_one_line_error(tiny_int4_bundle, tiny_fp32_bundle, tmp_path):
    res = run_cli("fidelity", str(tiny_int4_bundle), "--reference", str(tiny_fp32_bundle),
                  "--text", str(tmp_path / "absent.txt"))
    assert res.returncode != 0
    assert "cannot read --text" in res.stderr and "Traceback" not in res.stderr
