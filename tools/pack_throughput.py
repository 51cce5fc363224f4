"""Trials/hour, one trial at a time vs one pack of the same seeds, in one process, one thread:

    PYTHONPATH=. python tools/pack_throughput.py VARIANT STEPS SEEDS   (softmax | oscillator; quickstart shape)
"""
import sys, time, torch, yaml
from storage.records import TrialSpec
from workers.trial import run_trial
from workers.stacked import run_pack
torch.set_num_threads(1)
q=yaml.safe_load(open("studies/examples/quickstart.yaml"))
variant=sys.argv[1]; steps=int(sys.argv[2]); seeds=list(range(int(sys.argv[3])))
from workers.tasks import get_task
task=get_task("mqar"); opts=task.options(q["tasks"][0]["options"])
vo={"softmax":{}, "oscillator":{"d_osc":8,"p":1.0,"anchor_norm":"init","readout_padding_mask":True,"mode":"analytic","init":"random","t_max":30.0,"dt":0.05,"rtol":1e-4,"atol":1e-4,"jitter":0.05}}[variant]
train={**q["train"],"steps":steps,"eval_every":steps}
specs=[TrialSpec(study="tp",task="mqar",task_options=opts,variant=variant,variant_options=vo,model=q["model"],train=train,seed=s) for s in seeds]
run_trial(specs[0], storage_uri="/tmp/pack_throughput/tpw", cache_uri="/tmp/pack_throughput/c")  # warm the cache
t=time.perf_counter()
for sp in specs: assert run_trial(sp, storage_uri="/tmp/pack_throughput/tp1", cache_uri="/tmp/pack_throughput/c").status=="completed"
solo=time.perf_counter()-t
t=time.perf_counter(); rs=run_pack(specs, storage_uri="/tmp/pack_throughput/tp2", cache_uri="/tmp/pack_throughput/c"); pack=time.perf_counter()-t
assert all(r.status=="completed" for r in rs), rs[0].error
print(f"{variant} steps {steps} seeds {len(seeds)}: one-at-a-time {solo:.1f}s ({3600*len(seeds)/solo:.0f} trials/h), pack {pack:.1f}s ({3600*len(seeds)/pack:.0f} trials/h), ratio {solo/pack:.2f}")
