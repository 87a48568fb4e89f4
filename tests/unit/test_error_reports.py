"""A handled error is one log record: nothing raw from gevent on stderr.

gevent reports an exception that leaves a threadpool job, or a greenlet, to the hub, which
prints it with its traceback on stderr. safeio.threadpool_runner() keeps a job's exception
for its caller alone; log.setup() makes the hub's reports (a greenlet nobody watched died)
one loguru record each, traceback included.
"""
import json
import subprocess
import sys
import textwrap
import traceback

import gevent
import pytest

from geosmtp import safeio


def full_disk(path):
    raise OSError(28, "No space left on device", path)


def test_a_job_that_raises_raises_in_its_caller_only(capfd):
    run = safeio.threadpool_runner(gevent.get_hub().threadpool)
    with pytest.raises(OSError) as caught:
        run(full_disk, "/spool/msg/x")
    assert caught.value.errno == 28 and caught.value.filename == "/spool/msg/x"
    # the traceback still goes back to the thread where it began
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "full_disk" and "run" in frames
    gevent.sleep(0.05)  # the hub would print the job's error from its loop
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_a_job_returns_its_value():
    run = safeio.threadpool_runner(gevent.get_hub().threadpool)
    assert run(divmod, 7, 2) == (3, 1)
    assert run(lambda: None) is None
    assert isinstance(run(ValueError, "x"), ValueError)  # an exception returned is a value


def test_without_the_runner_gevent_prints_the_traceback(capfd):
    """What the runner is for: the same job through threadpool.apply is printed raw."""
    with pytest.raises(OSError):
        gevent.get_hub().threadpool.apply(full_disk, ("/spool/msg/y",))
    gevent.sleep(0.05)
    err = capfd.readouterr().err
    assert "Traceback" in err and "failed with OSError" in err


UNCAUGHT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys, gevent
    from geosmtp import log, safeio

    log.setup("INFO", sys.argv[2], sys.argv[1])
    def explode():
        raise RuntimeError("a bug in a greenlet")
    def handled():
        try:
            safeio.threadpool_runner(gevent.get_hub().threadpool)(open, "/nonexistent/file")
        except OSError as exc:
            log.logger.error("handled: {}", exc.strerror)
    gevent.spawn(explode).join()
    gevent.spawn(handled).join()
    gevent.sleep(0.05)
""")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_an_uncaught_error_is_one_record_with_its_traceback(tmp_path, fmt):
    logfile = tmp_path / "server.log"
    result = subprocess.run([sys.executable, "-c", UNCAUGHT, str(logfile), fmt],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    text = logfile.read_text()
    assert text.count("Traceback (most recent call last)") == 1
    if fmt == "json":
        records = [json.loads(line)["record"] for line in text.splitlines()]
        assert [r["level"]["name"] for r in records] == ["ERROR", "ERROR"]
        bug, handled = records
        assert bug["message"].startswith("uncaught RuntimeError in <Greenlet")
        assert bug["exception"]["type"] == "RuntimeError"
        assert handled["message"] == "handled: No such file or directory"
        assert handled["exception"] is None
    else:
        assert ', in explode\nRuntimeError: a bug in a greenlet\n' in text
        assert text.count(" ERROR ") == 2 and "handled: No such file or directory" in text
