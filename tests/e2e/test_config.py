"""Configuration: `mirror serve` refuses to start on a missing or malformed setting, with a
message naming the variable (and never echoing a secret), before it touches the database or
opens a port."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

from tests.conftest import API_TOKEN, SECRET

SHORT_SECRET = "whsec_" + base64.b64encode(b"only-9-bytes").decode()

# (variable, value or None for unset, a fragment the message must contain)
CASES: list[tuple[str, str | None, str]] = [
    ("MIRROR_WEBHOOK_SECRET", None, "is not set"),
    ("MIRROR_WEBHOOK_SECRET", "", "is empty"),
    ("MIRROR_WEBHOOK_SECRET", " , ", "is empty"),
    ("MIRROR_WEBHOOK_SECRET", "hunter2-not-a-secret", "does not start with 'whsec_'"),
    ("MIRROR_WEBHOOK_SECRET", "whsec_!!not~base64!!", "not valid base64"),
    ("MIRROR_WEBHOOK_SECRET", SHORT_SECRET, "too short"),
    ("MIRROR_WEBHOOK_SECRET", f"{SECRET}, whsec_%%%", "secret #2"),
    ("MIRROR_API_TOKEN", None, "at least 16 characters"),
    ("MIRROR_API_TOKEN", "short-token", "at least 16 characters"),
    ("MIRROR_API_TOKEN", " " * 20, "at least 16 characters"),
    ("MIRROR_PORT", "http", "must be an integer"),
    ("MIRROR_PORT", "70000", "between 0 and 65535"),
    ("MIRROR_MAX_BODY_BYTES", "10MB", "must be an integer"),
    ("MIRROR_REQUEST_TIMEOUT", "0", "between 1 and 300"),
    ("MIRROR_BATCH_SIZE", "lots", "must be an integer"),
    ("MIRROR_WORKERS", "0", "between 1 and 16"),
    ("MIRROR_UVLOOP", "maybe", "must be 1 or 0"),
    ("MIRROR_LOG_LEVEL", "loud", "must be one of"),
    ("MIRROR_PROJECTOR", "thread", "must be one of"),
]


def test_service_refuses_to_start_on_bad_settings_naming_the_variable() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    # Nothing listens there: a service that went on to the database would fail differently.
    base |= {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",
             "MIRROR_WEBHOOK_SECRET": SECRET, "MIRROR_API_TOKEN": API_TOKEN,
             "MIRROR_PORT": "0"}
    running = []
    for variable, value, fragment in CASES:
        env = dict(base)
        if value is None:
            env.pop(variable)
        else:
            env[variable] = value
        proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running.append((variable, value, fragment, proc))
    for variable, value, fragment, proc in running:
        out, err = proc.communicate(timeout=60)
        case = f"{variable}={value!r}"
        assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{err}"
        assert err.startswith(f"mirror: {variable}"), f"{case}: {err!r}"
        assert fragment in err, f"{case}: {err!r}"
        assert "webhook URL" not in out, f"{case}: it started serving"
        if variable == "MIRROR_WEBHOOK_SECRET" and value and value.strip(" ,"):
            for part in value.replace(",", " ").split():
                assert part not in err, f"{case}: the secret is echoed"
        assert "Traceback" not in err


# Commands other than serve read their settings the same way: `project` its batch size and
# worker count, every command its log level.
OTHER_COMMANDS = [
    (["project"], "MIRROR_BATCH_SIZE", "0", "between 1 and 100000"),
    (["project"], "MIRROR_BATCH_SIZE", "2k", "must be an integer"),
    (["project", "--workers", "2"], "MIRROR_WORKERS", "many", "must be an integer"),
    (["project"], "MIRROR_UVLOOP", "yes please", "must be 1 or 0"),
    (["migrate"], "MIRROR_LOG_LEVEL", "verbose", "must be one of"),
    (["status"], "MIRROR_LOG_LEVEL", "10", "must be one of"),
]


def test_other_commands_refuse_bad_settings_naming_the_variable() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    base["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/nowhere"
    for args, variable, value, fragment in OTHER_COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                              env={**base, variable: value}, text=True, timeout=60)
        case = f"mirror {' '.join(args)} with {variable}={value!r}"
        assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr}"
        assert proc.stderr.startswith(f"mirror: {variable}"), f"{case}: {proc.stderr!r}"
        assert fragment in proc.stderr and "Traceback" not in proc.stderr, case
