"""Job logs: a user error is one clean message, a bug keeps its traceback."""

from types import SimpleNamespace

import pytest

from locnet.fileio import InputError
from locnet.config import ConfigError
from locnet.runlog import job_logging


def test_a_user_error_in_a_job_is_one_clean_message(tmp_path, capsys):
    """An InputError ends the job with status 1 and its message once, in the log and on
    stderr, without a traceback; a bug keeps its traceback."""
    log_path = tmp_path / "ingest.log"
    smk = SimpleNamespace(log=[str(log_path)], rule="ingest", wildcards={}, output=[])
    problem = "case 'p1' (file /data/p1.nii.gz): image file not found"
    with pytest.raises(SystemExit) as info:
        with job_logging(smk):
            raise InputError(f"1 problem(s) in the input cohort:\n{problem}")
    assert info.value.code == 1
    err, log = capsys.readouterr().err, log_path.read_text()
    for text in (err, log):
        assert text.count(problem) == 1 and "Traceback" not in text, text
    with pytest.raises(ZeroDivisionError):
        with job_logging(smk):
            1 / 0
    assert "Traceback" in log_path.read_text()


def test_a_config_error_in_a_job_is_one_clean_message_too(tmp_path, capsys):
    smk = SimpleNamespace(log=[str(tmp_path / "split.log")], rule="split", wildcards={},
                          output=[])
    with pytest.raises(SystemExit):
        with job_logging(smk):
            raise ConfigError("invalid config:\n  split.seed: 'x' is not of type 'integer'")
    err = capsys.readouterr().err
    assert err.count("split.seed") == 1 and "Traceback" not in err
