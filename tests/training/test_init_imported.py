"""`agentprm train --init` of an imported public PRM (a native template, a non-linear head) is refused in one
line: training renders marker templates and trains linear heads only."""

from __future__ import annotations

import pytest

from model_store.importers import import_value_model
from tests.model_store import public_prms
from training.backbone import InitError, initialize


def test_init_from_an_imported_native_prm_is_refused(tmp_path):
    public_prms.trl_prm(tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name="t")
    with pytest.raises(InitError, match="a linear2 head with a native template is served as imported"):
        initialize(str(tmp_path / "ckpt"), corpus="", max_seq_len=128, base_rate=0.5)
