"""Times the demo's FID phase with whatever patch_diffusion PYTHONPATH gives (so older
code can be timed too): sampling N images from a checkpoint in the run's precision,
then their Inception features, and the FID against a reference when one is given.
Prints one JSON line with the seconds and the CPU cores each part kept busy.

    PYTHONPATH=src python benchmarks/fid_phase.py CHECKPOINT 500 [REF.npz]

Results and the machine are in BENCHMARKS.md ("CPU speed").
"""
import inspect, json, sys, time, torch
import patch_diffusion
from patch_diffusion.evaluate import sample_batches
from patch_diffusion.generate import load_denoiser
from patch_diffusion.metrics import load_inception
from patch_diffusion.metrics.fid import compute_features
from patch_diffusion.metrics import load_reference
from patch_diffusion.evaluate import score
ckpt, num = sys.argv[1], int(sys.argv[2])
dev = torch.device("cpu")
net, config = load_denoiser(ckpt, dev)
kw = {"precision": config.precision} if "precision" in inspect.signature(sample_batches).parameters else {}
c0 = time.process_time(); t0 = time.perf_counter()
images = list(sample_batches(net, config.model.resolution, list(range(num)), config.sampler, device=dev, progress=False, **kw))
t1 = time.perf_counter(); c1 = time.process_time()
inc = load_inception(None, dev)
t2 = time.perf_counter(); c2 = time.process_time()
feats = compute_features(images, inc, dev, total=num, progress=False)
t3 = time.perf_counter(); c3 = time.process_time()
print(json.dumps({"code": patch_diffusion.__file__, "checkpoint": ckpt, "num": num, "precision": kw.get("precision", "fp32"),
                  "sampling_s": round(t1 - t0, 2), "inception_load_s": round(t2 - t1, 2), "inception_s": round(t3 - t2, 2),
                  "total_s": round(t3 - t0, 2),
                  "sampling_cores_busy": round((c1 - c0) / (t1 - t0), 2), "inception_cores_busy": round((c3 - c2) / (t3 - t2), 2),
                  "torch_threads": torch.get_num_threads(),
                  "fid": (score(feats, load_reference(sys.argv[3]))["fid"] if len(sys.argv) > 3 else None)}))
