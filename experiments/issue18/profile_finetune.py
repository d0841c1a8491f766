"""Where a fine-tune's time goes: accept 10 evenly spaced slices of COVID-19-CT-Seg volume 3 and time
the JSON progress lines of `python -m DRSegUNetLib finetune` (start, reference scoring, steps, gate).

    .venv/bin/python experiments/issue18/profile_finetune.py 2 [ZENODO_NPZ [FINETUNE OPTIONS...]]   # torch threads
"""
import sys, time, subprocess, json, tempfile, os
sys.path.insert(0,'.'); sys.path.insert(0,'bench')
from adaptation import correction_labels, evenly
from DRSegUNetLib.data import read_zenodo_npz
from DRSegUNetLib.store import CorrectionsStore
z=read_zenodo_npz(sys.argv[2] if len(sys.argv) > 2 else '../shared/data/zenodo20/zenodo20_dev.npz', groups=[3])
d=tempfile.mkdtemp()
c=CorrectionsStore(d+'/c')
for i in evenly(len(z),10): c.add(z[i].hu, correction_labels(z[i]), (1.5,1.5), 'v', i, known=('lung','infection'))
t0=time.time()
p=subprocess.Popen([sys.executable,'-m','DRSegUNetLib','finetune','--corrections',d+'/c','--store',d+'/m','--json-progress','--threads',sys.argv[1],*sys.argv[3:]], stdout=subprocess.PIPE, text=True)
last=None
for line in p.stdout:
    e=json.loads(line); t=time.time()-t0
    key=(e['stage'])
    if e['stage']!='train' or e['step'] in (1,e['total']): print(f"{t:6.1f}s {e['stage']} {e['step']}/{e['total']} {e.get('message','')[:80]}")
p.wait(); print('total', round(time.time()-t0,1))
