"""The tooling of the GPU device run (issue 22): the wheel set's closure and stripping, and the stand-in
Inception hook. The whole set is proved by hand (benchmarks/RESULTS.md: a venv holding only the device image's
packages runs `gpu_pipeline.py --smoke` from it); these check the parts that decide what travels."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_pipeline, gpu_wheels

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


def test_the_requirement_check_names_a_version_the_wheels_do_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the check puts the target first on it
    info = tmp_path / "fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake\nVersion: 1.0\nRequires-Dist: packaging>=1\n"
        "Requires-Dist: absent-thing; extra == 'docs'\n"
    )
    gpu_wheels.main(["check", "--target", str(tmp_path)])  # met; the extra's requirement is not asked for
    assert "1 distributions" in capsys.readouterr().out
    (info / "METADATA").write_text((info / "METADATA").read_text() + "Requires-Dist: packaging>=999\n")
    with pytest.raises(SystemExit) as stop:
        gpu_wheels.main(["check", "--target", str(tmp_path)])
    assert "fake needs packaging>=999 but has " in str(stop.value) and "\n" not in str(stop.value)


def test_the_pipeline_summary_drops_the_compile_window_and_times_it():
    # windows at steps 20, 40, 60 of a run from step 0 (batch 256): the first holds 10 s of compilation
    hist = {
        "images_per_s": [(20, 256 / 0.65, 1.0), (40, 256 / 0.15, 2.0), (60, 256 / 0.15, 3.0)],
        "step_time_s": [(20, 0.65, 1.0), (40, 0.15, 2.0), (60, 0.15, 3.0)],
        "data_wait_share": [(20, 0.5, 1.0), (40, 0.01, 2.0), (60, 0.03, 3.0)],
        "gpu_memory_peak_gib": [(20, 9.0, 1.0), (40, 10.0, 2.0), (60, 10.0, 3.0)],
    }
    out = gpu_pipeline.summarize_training(hist, 0, 60, batch=256)
    assert out["images_per_s"] == pytest.approx(256 / 0.15, abs=0.1) and out["windows"] == 2
    assert out["data_wait_share"] == pytest.approx(0.02) and out["gpu_memory_peak_gib"] == 10.0
    assert out["compile_s"] == pytest.approx((0.65 - 0.15) * 20)
    # a resume from step 50: its first window (steps 51-60) holds 10 steps, not log_every's 20
    resumed = {k: [(s + 40, x, t) for s, x, t in rows] for k, rows in hist.items()}  # windows at 60, 80, 100
    out = gpu_pipeline.summarize_training(resumed, 50, 100, batch=256)
    assert out["compile_s"] == pytest.approx((0.65 - 0.15) * 10) and out["windows"] == 2
