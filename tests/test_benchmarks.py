"""The GPU benchmark scripts, run at tiny size on the CPU: every code path the one-shot GPU run takes."""

import json

import pytest

from benchmarks import eval_speed, train_step, verify_shards


def test_train_step_benchmark_measures_variants_and_compares_learning(tmp_path):
    out = tmp_path / "train_step.json"
    result = train_step.main(
        [
            "--resolution",
            "32",
            "--ch",
            "8",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--compile-backend",
            "aot_eager",
            "--variants",
            "reference,fast,+bf16",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--learning-steps",
            "4",
            "--window",
            "2",
            "--profile",
            "2",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == result
    rows = result["variants"]
    assert set(rows) == {"reference", "fast", "+bf16"}
    assert all(r["finite"] and r["images_per_s"] > 0 for r in rows.values())
    assert rows["reference"]["speedup_vs_reference"] == 1.0
    assert rows["fast"]["levers"]["compile"] is True and rows["+bf16"]["levers"] == {"precision": "bf16"}
    assert result["flops_per_step"] > 0  # MFU: the reference's counted FLOPs per second over the stated peak
    assert rows["fast"]["mfu"] == pytest.approx(
        result["flops_per_step"] / rows["fast"]["step_s"] / 989.4e12, rel=0.02, abs=1e-6
    )  # both rounded
    learning = result["learning"]
    assert len(learning["curves"]["reference"]["d_loss"]) == 4 and len(learning["curves"]["fast"]["g_loss"]) == 4
    assert set(learning["spectral_norm_max_error_after"]) == {"reference", "fast"}
    by_layer = learning["spectral_norm_error_by_layer"]["fast"]  # signed, per layer; its largest is the max
    assert len(by_layer["D"]) > 4 and all(name for name in by_layer["D"])
    assert max(abs(e) for e in by_layer["D"].values()) == pytest.approx(
        learning["spectral_norm_max_error_after"]["fast"]["D"], abs=2e-5
    )
    profile = rows["fast"]["profile"]  # where the fast step's time goes: kinds of work and the top operators
    assert profile["steps"] == 2 and profile["ms_per_step"] > 0 and len(profile["top"]) > 5
    assert sum(profile["shares"].values()) == pytest.approx(1, abs=0.01) and "convolution" in profile["shares"]
    assert "profile" not in rows["reference"]


def test_train_step_benchmark_rejects_unknown_variants():
    with pytest.raises(SystemExit, match="unknown variant"):
        train_step.main(["--device", "cpu", "--variants", "reference,warp_drive"])


def test_train_step_benchmark_skips_variants_once_the_budget_is_spent():
    result = train_step.main(
        [
            "--resolution",
            "32",
            "--ch",
            "8",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--variants",
            "reference,+sdpa",
            "--budget-s",
            "0",
        ]
    )
    assert all("skipped" in r for r in result["variants"].values())


def test_eval_speed_benchmark_times_a_fid_and_is_pass(tmp_path):
    result = eval_speed.main(
        [
            "--resolution",
            "32",
            "--ch",
            "8",
            "--num-classes",
            "10",
            "--num-samples",
            "20",
            "--batch",
            "10",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert result["num_samples"] == 20 and result["finite"] and result["seconds"] > 0
    assert json.loads((tmp_path / "eval.json").read_text())["images_per_s"] == result["images_per_s"]


def test_verify_shards_benchmark_reports_sha256_speed_and_size_check_time(digits, tmp_path):
    out = tmp_path / "verify.json"
    result = verify_shards.main(
        ["--shards", str(digits / "train"), "--min-gb", "0.02", "--cold-mb", "2", "--photos", "4", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    warm = result["repeated_passes"]
    assert warm["bytes"] >= 0.02e9 and warm["mb_per_s_median"] > 0 and result["num_shards"] == 8
    assert result["cold_file"]["bytes"] == 2 << 20 and result["size_check_s_per_1000_shards"] > 0
    assert result["imagenet_train_estimate"]["gb"] > 0


def test_loader_speed_benchmark_times_decode_and_both_worker_counts_on_equal_samples(tmp_path):
    from benchmarks import loader_speed

    out = tmp_path / "loader_speed.json"
    result = loader_speed.main(["--tiny", "--no-ray", "--s3", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["shards"]["num_shards"] == 2 and result["pinned"] is False
    assert all(d["images_per_s"] > 0 for d in result["decode_one_core"].values())
    runs = [result["ours"]["workers_1"], result["ours"]["workers_2"]]
    assert all(r["images_per_s"] > 0 for r in runs) and {r["samples"] for r in runs} == {3 * 32}
    assert result["ours"]["same_order_with_1_and_2_workers"] and "ray_data" not in result
    s3 = result["object_storage"]  # the same shards from a local S3 server, side by side with the disk
    assert s3["same_batches_as_disk"] and all(r > 0 for r in s3["ratios_to_disk"].values())
    requests = s3["requests"]
    assert requests["disk_workers_1"]["shards_fetched"] == 0
    assert requests["s3_cold_cache_workers_2"] == {
        "shards_fetched": 2,
        "requests_per_shard_max": 2,
        "requests_total": 4,
    }
    assert requests["s3_warm_cache_workers_2"]["shards_fetched"] == 0  # HEAD + GET once per shard, then none
