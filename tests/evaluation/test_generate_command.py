"""``python -m cyb_lightning generate`` on the tiny checkpoint."""

from __future__ import annotations

import torch


def test_generate_command_prints_every_policy(tiny_run, tmp_path, capsys):
    from cyb_lightning.__main__ import main

    ckpt, _ = tiny_run
    html = tmp_path / "gen.html"
    threads = torch.get_num_threads()
    main(["generate", "--ckpt_path", str(ckpt), "--prompt", "def main(", "--max_new_tokens", "6",
          "--temperature", "0", "--compare", "--html", str(html)])  # fmt: skip
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for kind in ("threshold", "fixed", "none"):  # the default policy is the trained rule, τ = 0.5
        assert f"=== policy {kind}:" in out
    assert "3.00 forward steps per token" in out and "1.00 forward steps per token" in out
    assert html.is_file() and "<span" in html.read_text()
