import sys, tempfile, torch, json
sys.path.insert(0,'.')
import importlib.util
spec=importlib.util.spec_from_file_location('ar','experiments/adapt_recipes.py'); ar=importlib.util.module_from_spec(spec); spec.loader.exec_module(ar)
from DRSegUNetLib import default_model_path
from DRSegUNetLib.checkpoint import load_checkpoint
from DRSegUNetLib.config import InferenceConfig, TrainConfig
from DRSegUNetLib.data import read_zenodo_npz, resample_sample, read_medseg_folder
from DRSegUNetLib.inference import Predictor
from DRSegUNetLib.training import train, AugmentConfig
from DRSegUNetLib.adaptation import load_adaptation_data, adaptation_data_path
from dataclasses import replace
torch.set_num_threads(1)
ck=load_checkpoint(default_model_path())
med=read_medseg_folder(ar.SHARED/'medseg'/'train50'); ref=[s for s in med if s.name in ar.MEDSEG_REF]
G=int(sys.argv[1]); lr=float(sys.argv[2])
z=read_zenodo_npz(ar.SHARED/'zenodo20'/'zenodo20_dev.npz', groups=[G])
idx=ar.evenly(len(z),5)
corr=[replace(resample_sample(z[i],(1.5,1.5),1.2),group='corrections') for i in idx]
rest=[z[i] for i in range(len(z)) if i not in idx][::3]
data=load_adaptation_data(adaptation_data_path(default_model_path())).without_groups([f'zenodo{G}'])
replay=[replace(resample_sample(s, data.spacing[s.name],1.2) if data.spacing.get(s.name) else s, group='replay') for s in data.replay]
base=Predictor(ck.build_model(), ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
b_rest=ar.score(base, rest, (1.5,1.5), ('infection',)); b_ref=ar.score(base, ref, None, ('ggo','infection'))
print('base', b_rest, b_ref, flush=True)
sd0={k:v.clone() for k,v in ck.build_model().state_dict().items()}
for seed in (0,1,2):
    cfg=TrainConfig(epochs=1, steps_per_epoch=40, batch_size=4, crop=256, lr=lr, frozen_layers=2, bn='frozen', loss='ce+regiondice', seed=seed, source_weights=(('corrections',0.7),('replay',0.3)))
    with tempfile.TemporaryDirectory() as t:
        r=train(corr+replay,[],t,cfg,init=ck,device='cpu')
    sd1={k:v.detach().clone() for k,v in r.model.state_dict().items()}
    for a in (1.0, 0.5):
        m=ck.build_model(); m.load_state_dict({k:(sd0[k]*(1-a)+sd1[k]*a if sd0[k].is_floating_point() else sd1[k]) for k in sd0})
        p=Predictor(m, ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
        print(seed, a, 'rest', round(ar.score(p, rest, (1.5,1.5), ('infection',))['infection']-b_rest['infection'],3), 'ref', {k:round(v-b_ref[k],3) for k,v in ar.score(p, ref, None, ('ggo','infection')).items()}, flush=True)
