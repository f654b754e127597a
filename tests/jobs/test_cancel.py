"""jobs.cancel's answers where there is nothing it can cancel (its Kubernetes path is tested with the
fake API server in test_kubernetes_executor.py)."""

from __future__ import annotations

import json
import sys

from jobs.cancel import main


def test_a_local_pipeline_is_refused_with_how_to_stop_it(tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # not needed to say so: the extra is optional
    assert main(["--config", str(tiny_config())]) == 2
    out, err = capsys.readouterr()
    assert "executor.kind is local: local jobs stop with their controller" in err
    assert json.loads(out.strip().splitlines()[-1])["deleted"] == []


def test_without_the_kubernetes_client_it_says_what_to_install(tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if selma[kubernetes] were not installed
    assert main(["--config", str(tiny_config()), "--backend", "kubernetes"]) == 2
    out, err = capsys.readouterr()
    assert "pip install 'selma[kubernetes]'" in err
    assert "pip install 'selma[kubernetes]'" in json.loads(out.strip().splitlines()[-1])["error"]
