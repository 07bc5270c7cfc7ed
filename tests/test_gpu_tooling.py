"""The tooling of the GPU device run (issue 22): the wheel set's closure and stripping, and the stand-in
Inception hook. The whole set is proved by hand (benchmarks/RESULTS.md: a venv holding only the device image's
packages runs `gpu_pipeline.py --smoke` from it); these check the parts that decide what travels."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks import gpu_wheels

REPO = Path(__file__).resolve().parent.parent

FAKE = {  # name -> (version, requirements), as installed metadata gives them
    "app": ("1.0", ["lib", "base>=2", 'opt; extra == "x"', 'other; extra == "y"', 'old; python_version < "3.12"']),
    "lib": ("2.0", ['Plat_Dep; sys_platform == "linux"', 'win; sys_platform == "win32"']),
    "opt": ("3.0", ["lib"]),
    "plat-dep": ("4.0", []),
    "old": ("5.0", []),
}


def test_the_closure_follows_extras_and_markers_for_the_target_and_skips_what_the_device_has():
    pins = gpu_wheels.closure(["app[x]"], {"base"}, "3.12", lambda name: FAKE[name])
    # extra x and Linux markers followed; extra y, Windows and the Python 3.11-only requirement not; base is there
    assert pins == {"app": "1.0", "lib": "2.0", "opt": "3.0", "plat-dep": "4.0"}
    assert "old" in gpu_wheels.closure(["app"], {"base"}, "3.11", lambda name: FAKE[name])


def test_stripping_a_wheel_drops_the_files_and_their_record_lines(tmp_path):
    wheel = tmp_path / "ray-1-cp312-cp312-linux_x86_64.whl"
    record = "ray/__init__.py,sha256=a,1\nray/jars/ray_dist.jar,sha256=b,2\nray/rllib/x.py,sha256=c,3\nray-1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("ray/__init__.py", "x = 1\n")
        z.writestr("ray/jars/ray_dist.jar", b"\0" * 50_000)
        z.writestr("ray/rllib/x.py", "y = 2\n")
        z.writestr("ray-1.dist-info/RECORD", record)
    saved = gpu_wheels.strip(wheel, ("ray/jars/", "ray/rllib/"))
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == ["ray/__init__.py", "ray-1.dist-info/RECORD"]
        assert z.read("ray-1.dist-info/RECORD").decode() == "ray/__init__.py,sha256=a,1\nray-1.dist-info/RECORD,,\n"
        assert z.read("ray/__init__.py") == b"x = 1\n"
    assert saved > 0


def test_the_stand_in_hook_accepts_only_the_file_it_names(tmp_path):
    standin = tmp_path / "stand-in.pth"
    standin.write_bytes(b"stand-in weights")
    digest = hashlib.sha256(standin.read_bytes()).hexdigest()
    code = (
        "import sys; from sagan import inception; from sagan.errors import MetricsError\n"
        "print(inception.INCEPTION_SHA256_PREFIX)\n"
        "try:\n    inception.inception_weights(sys.argv[1], download=False); print('accepted')\n"
        "except MetricsError as e:\n    print('refused')\n"
    )
    site = str(REPO / "benchmarks/standin_site")

    def run(**env):
        environ = {k: v for k, v in os.environ.items() if k != "SAGAN_STANDIN_INCEPTION_SHA256"}
        environ.update(env, PYTHONPATH=os.pathsep.join([site, str(REPO)]))
        out = subprocess.run([sys.executable, "-c", code, str(standin)], env=environ, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run(SAGAN_STANDIN_INCEPTION_SHA256=digest) == [digest, "accepted"]
    assert run() == ["6726825d", "refused"]  # without the variable, the official digest is required
