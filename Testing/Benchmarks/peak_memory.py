"""Peak memory: a 256x256x180 volume through a 2D model (batched slices) and a 3D model (sliding window)."""
import resource, sys, time, json
import numpy as np, torch
from pathlib import Path
from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.models import ModelCard, save_model
from DiffusionMICLib.volume import Volume, Geometry
import DiffusionMICLib as dmic
dims = int(sys.argv[1])
torch.manual_seed(0)
net_cfg = network_config(2, 1, spatial_dims=dims)
net = build_network(net_cfg)
with torch.no_grad():
    for p in net.parameters(): p.add_(torch.randn_like(p) * 0.01)
card = ModelCard(name=f"mem{dims}d", task="denoise", inputs=["noisy"], outputs=["clean"], network=net_cfg,
                 schedule={"prediction_type": "sample", "train_steps": 2}, sampler={"name": "dpm++2m", "steps": 2},
                 normalisation={"method": "percentile", "percentile": 50, "value": 0.5},
                 patch=[64, 64] if dims == 2 else [64, 64, 64])
save_model(Path(f"/tmp/mem{dims}d"), card, net)
rng = np.random.default_rng(0)
a = np.zeros((180, 256, 256), np.float32); a[10:170, 20:236, 20:236] = 300 + 30 * rng.standard_normal((160, 216, 216))
vol = Volume(a, Geometry((256, 256, 180), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.time()
out = dmic.denoise(vol, f"/tmp/mem{dims}d", steps=2, batch_size=16).outputs["output"]
print(json.dumps({"dims": dims, "shape": list(out.array.shape), "seconds": round(time.time() - t, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "rss_before_run_mb": round(base)}))
