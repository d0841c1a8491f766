import sys, tempfile, torch, time
sys.path.insert(0,'.')
sys.argv=['x']
import importlib.util
spec=importlib.util.spec_from_file_location('ar','experiments/adapt_recipes.py'); ar=importlib.util.module_from_spec(spec); spec.loader.exec_module(ar)
from DRSegUNetLib import default_model_path
from DRSegUNetLib.checkpoint import load_checkpoint
from DRSegUNetLib.config import InferenceConfig, TrainConfig
from DRSegUNetLib.data import read_zenodo_npz, resample_sample, read_medseg_folder
from DRSegUNetLib.inference import Predictor
from DRSegUNetLib.training import train, AugmentConfig
from dataclasses import replace
torch.set_num_threads(1)
ck=load_checkpoint(default_model_path())
med=read_medseg_folder(ar.SHARED/'medseg'/'train50'); ref=[s for s in med if s.name in ar.MEDSEG_REF]
z=read_zenodo_npz(ar.SHARED/'zenodo20'/'zenodo20_dev.npz', groups=[3])
corr=[replace(resample_sample(z[i],(1.5,1.5),1.2),group='corrections') for i in ar.evenly(len(z),5)]
base=Predictor(ck.build_model(), ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
print('base', ar.score(base, ref, None, ('ggo','infection')))
for lr, bn in [][:0] and [(0.0,'frozen'),(1e-9,'frozen')]:
    cfg=TrainConfig(epochs=1, steps_per_epoch=5, batch_size=4, crop=256, lr=max(lr,1e-12), frozen_layers=2, bn=bn)
    with tempfile.TemporaryDirectory() as t:
        r=train(corr,[],t,cfg,init=ck,device='cpu')
    p=Predictor(r.model, ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
    print(lr,bn, ar.score(p, ref, None, ('ggo','infection')))
from DRSegUNetLib.metrics import MetricAccumulator
import numpy as np
def sc(p, ss, sp):
    acc=MetricAccumulator(('infection','lung'))
    area=0
    for s in ss:
        lab=p.predict_slices([s.hu], spacing=sp, eight_bit=True)[0]; area+=np.isin(lab,(1,2)).sum()
        acc.add(s.name, lab, {r:s.region_truth(r) for r in ('infection','lung')})
    sm=acc.summary(); return {r:(round(v['mean']['dice'],3), round(v['mean']['precision'],3), round(v['mean']['recall'],3)) for r,v in sm.items()}, area
corr1=[replace(c, group='zenodo3') for c in corr]
print('train before', sc(base, corr1, None))
rest=[z[i] for i in range(len(z)) if i not in ar.evenly(len(z),5)][::4]
print('rest before', sc(base, rest, (1.5,1.5)))
for lr,bn,fl in [(3e-5,'frozen',0.5),(3e-5,'frozen',0.0),(3e-5,'train',0.0)]:
    cfg=TrainConfig(epochs=1, steps_per_epoch=40, batch_size=4, crop=256, lr=lr, frozen_layers=2, bn=bn)
    with tempfile.TemporaryDirectory() as t:
        r=train(corr,[],t,cfg,init=ck,device='cpu', augment=AugmentConfig(foreground_fraction=fl))
    print([round(h['loss'],3) for h in r.history])
    p=Predictor(r.model, ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
    print(lr,bn,fl,'train', sc(p, corr1, None), 'rest', sc(p, rest, (1.5,1.5)))
