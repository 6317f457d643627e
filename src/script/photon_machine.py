"""photon_machine: the machine API for photon-cluster test scripts.

Written out by the driver next to the script and imported before it runs.
Names and meanings follow the NixOS test driver (node01.succeed(...),
wait_for_unit, subtest, ...); the work is done by the driver, which this
module reaches over a Unix socket (path in PHOTON_SCRIPT_SOCKET) with one
JSON object per line each way. Timeouts are seconds of real time, and every
wait polls on the driver side, so Ctrl-C and --timeout reach it.
Standard library only.
"""

import base64
import contextlib
import json
import os
import socket
import sys
import time
import traceback


class ScriptError(Exception):
    """A call that failed: the driver's message, the command and its output."""

    def __init__(self, message, command=None, output=None, node=None):
        super().__init__(message)
        self.command = command
        self.output = output
        self.node = node


class _Driver:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = self.sock.makefile("r", encoding="utf-8")

    def _request(self, op, **args):
        args["op"] = args.get("op", op)
        if args.get("line") is None:
            args["line"] = _script_line()
        self.sock.sendall((json.dumps(args) + "\n").encode())
        reply = self.reader.readline()
        if not reply:
            raise ScriptError("the driver closed the connection")
        reply = json.loads(reply)
        if "error" in reply:
            raise ScriptError(
                reply["error"],
                reply.get("command"),
                reply.get("output"),
                args.get("node"),
            )
        return reply.get("result")


_driver = None
_script_file = None


def _script_line():
    """The line of the user's script that made the current call."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _script_file:
            return frame.f_lineno
        frame = frame.f_back
    return None


def _raised_at(e):
    """The last line of the user's script in the exception's traceback."""
    lines = [
        f.lineno
        for f in traceback.extract_tb(e.__traceback__)
        if f.filename == _script_file
    ]
    return lines[-1] if lines else None


class Machine:
    """One node of the cluster, by its name."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "<Machine %s>" % self.name

    def _call(self, op, **args):
        return _driver._request(op, node=self.name, **args)

    # Commands.
    def execute(self, command, check_return=True, check_output=True, timeout=900):
        """Runs command; returns (status, stdout)."""
        r = self._call("exec", command=command, timeout=timeout)
        return r["status"], r["stdout"]

    def succeed(self, *commands, timeout=900):
        """Runs each command; raises unless each exits 0. Returns the stdout."""
        out = ""
        for c in commands:
            out += self._call("exec", command=c, timeout=timeout, expect="success")["stdout"]
        return out

    def fail(self, *commands, timeout=900):
        """Runs each command; raises unless each exits non-zero."""
        out = ""
        for c in commands:
            out += self._call("exec", command=c, timeout=timeout, expect="failure")["stdout"]
        return out

    def wait_until_succeeds(self, command, timeout=900):
        """Repeats command until it exits 0 (at most timeout seconds).
        Returns the stdout of the try that did."""
        return self._call("wait_until", command=command, success=True, timeout=timeout)["stdout"]

    def wait_until_fails(self, command, timeout=900):
        """Repeats command until it exits non-zero (at most timeout seconds).
        Returns the stdout of the try that did."""
        return self._call("wait_until", command=command, success=False, timeout=timeout)["stdout"]

    def systemctl(self, q, user=None):
        """systemctl q; returns (status, stdout)."""
        if user is not None:
            q = "--user -M %s@ %s" % (user, q)
        return self.execute("systemctl " + q)

    def get_unit_info(self, unit, user=None):
        """The unit's properties (systemctl show) as a dict."""
        status, out = self.systemctl("--no-pager show " + _quote(unit), user)
        if status != 0:
            raise ScriptError("retrieving systemctl info for unit %s failed" % unit)
        info = {}
        for line in out.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                info[k] = v
        return info

    def wait_for_unit(self, unit, user=None, timeout=900):
        """Waits until unit is active; fails at once if it failed."""
        return self._call("wait_for_unit", unit=unit, timeout=timeout)

    def wait_for_file(self, filename, timeout=900):
        return self.wait_until_succeeds("test -e " + _quote(filename), timeout)

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        return self.wait_until_succeeds(_port_probe(addr, port), timeout)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        return self.wait_until_fails(_port_probe(addr, port), timeout)

    # Files.
    def copy_from_host(self, source, target):
        """Copies a host file into the node at target."""
        with open(source, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        self._call("write_file", path=target, data=data)

    def copy_from_vm(self, source, target_dir=""):
        """Copies a node file into the artifact directory (under target_dir)."""
        r = self._call("read_file", path=source)
        out_dir = os.path.join(os.environ.get("out", os.getcwd()), target_dir)
        os.makedirs(out_dir, exist_ok=True)
        dest = os.path.join(out_dir, os.path.basename(source.rstrip("/")))
        with open(dest, "wb") as f:
            f.write(base64.b64decode(r["data"]))
        return dest

    # Power and faults.
    def crash(self):
        """Kills the node's QEMU at once, like pulling the plug."""
        self._call("crash")

    def shutdown(self, timeout=120):
        """Powers the node down cleanly (its power button: systemd stops its
        services) and waits until it is off; killed after `timeout` s."""
        self._call("shutdown", timeout=timeout)

    def start(self):
        """Boots the node again (a no-op if it runs) and waits until ready."""
        self._call("start")

    def block(self):
        """Cuts the node off the network (a partition of it against the rest)."""
        self._call("block")

    def unblock(self):
        """Heals every partition."""
        _driver._request("heal")

    def pause(self):
        """Freezes the node's CPUs (QEMU stop)."""
        self._call("pause")

    def resume(self):
        self._call("resume")

    def link(self, loss=0.0, delay_ms=0, duplicate=0.0):
        """Degrades the node's link: loss and duplicate in 0..1, delay in ms."""
        self._call("link", loss=loss, delay_ms=delay_ms, duplicate=duplicate)

    def sleep(self, secs):
        _driver._request("sleep", secs=secs)


def _quote(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


def _port_probe(addr, port):
    return "bash -c %s" % _quote("exec 3<>/dev/tcp/%s/%d" % (addr, int(port)))


def start_all():
    """Every node runs already when a script starts; boots any that stopped."""
    for m in machines:
        m.start()


def sleep(secs):
    _driver._request("sleep", secs=secs)


def partition(*groups):
    """Splits the cluster: partition([node01], [node02, node03])."""
    names = [[m.name if isinstance(m, Machine) else str(m) for m in g] for g in groups]
    _driver._request("partition", groups=names)


def heal():
    _driver._request("heal")


def capture_start(name="capture.pcap"):
    """Starts writing every frame of the fabric to name (artifact dir)."""
    _driver._request("capture_start", name=name)


def capture_stop():
    return _driver._request("capture_stop")


def snapshot_save(name="script"):
    """Saves the whole cluster, paused together, inside each node's disk."""
    return _driver._request("snapshot_save", name=name)


def snapshot_restore(name="script"):
    """Puts the whole cluster back to `snapshot_save(name)`, in place; every
    node's clock is set to now again."""
    return _driver._request("snapshot_restore", name=name)


def retry(fn, timeout=900):
    """Calls fn(last_try) until it returns true, at most timeout seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        last = time.monotonic() + pause >= deadline
        if fn(last):
            return
        if last:
            raise ScriptError("action timed out after %s s" % timeout)
        _driver._request("sleep", secs=pause)
        pause = min(pause * 2, 1.0)


_subtest_failed = False


@contextlib.contextmanager
def subtest(name):
    """A named part of the script: one check in result.json and JUnit."""
    global _subtest_failed
    _driver._request("subtest_begin", name=name)
    try:
        yield
    except Exception as e:
        _subtest_failed = True
        _driver._request(
            "subtest_end",
            name=name,
            passed=False,
            message="%s: %s" % (type(e).__name__, e),
            traceback=traceback.format_exc(),
            command=getattr(e, "command", None),
            output=getattr(e, "output", None),
            failed_node=getattr(e, "node", None),
        )
        raise
    _driver._request("subtest_end", name=name, passed=True)


machines = []


def _objects():
    """One Machine per node (by its name), the globals, and `machines`."""
    env = {k: globals()[k] for k in __all__}
    for name in _driver._request("nodes"):
        m = Machine(name)
        machines.append(m)
        env[name.replace("-", "_")] = m
    env["machines"] = machines
    return env


def _interactive():
    """The objects of a script, for `script --interactive`'s prompt."""
    global _driver
    _driver = _Driver(os.environ["PHOTON_SCRIPT_SOCKET"])
    env = _objects()
    print("photon-cluster: %s; files copied out go to %s" % (
        ", ".join(m.name for m in machines), os.environ["out"]), file=sys.stderr)
    return env


def _run(path):
    global _driver, _script_file
    _driver = _Driver(os.environ["PHOTON_SCRIPT_SOCKET"])
    _script_file = os.path.abspath(path)
    env = _objects()
    env["__file__"] = _script_file
    env["__name__"] = "__main__"
    with open(_script_file) as f:
        code = compile(f.read(), _script_file, "exec")
    try:
        exec(code, env)
    except Exception as e:
        if not _subtest_failed:
            _driver._request(
                "subtest_end",
                name=None,
                # The script's frame is gone by now: its line is in the traceback.
                line=_raised_at(e),
                passed=False,
                message="%s: %s" % (type(e).__name__, e),
                traceback=traceback.format_exc(),
                command=getattr(e, "command", None),
                output=getattr(e, "output", None),
                failed_node=getattr(e, "node", None),
            )
        return 1
    return 0


__all__ = [
    "Machine", "ScriptError", "start_all", "sleep", "partition", "heal",
    "capture_start", "capture_stop", "snapshot_save", "snapshot_restore",
    "retry", "subtest",
]
