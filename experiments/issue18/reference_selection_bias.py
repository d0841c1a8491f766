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
med=read_medseg_folder(ar.SHARED/'medseg'/'train50')
VAL=ar.MEDSEG_REF; TEST=["1","2","26","30","41","42","46","47","49","57"]
TRAIN=[s.name for s in med if s.name not in VAL+TEST]
sets={n:[s for s in med if s.name in ids] for n,ids in (('val',VAL),('test',TEST),('train',TRAIN))}
base=Predictor(ck.build_model(), ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
b={n:ar.score(base, ss, None, ('ggo','infection')) for n,ss in sets.items()}
print('base', b, flush=True)
data=load_adaptation_data(adaptation_data_path(default_model_path()))
for G in sys.argv[1:]:
    if G=='medseg':
        pool=[s for s in med if s.name in TRAIN][::6][:5]; corr=[replace(s,group='corrections') for s in pool]
        d=data.without_groups(['medseg'])
    else:
        z=read_zenodo_npz(ar.SHARED/'zenodo20'/'zenodo20_dev.npz', groups=[int(G)])
        corr=[replace(resample_sample(z[i],(1.5,1.5),1.2),group='corrections') for i in ar.evenly(len(z),5)]
        d=data.without_groups([f'zenodo{G}'])
    replay=[replace(resample_sample(s, d.spacing[s.name],1.2) if d.spacing.get(s.name) else s, group='replay') for s in d.replay]
    for lr in (1e-4,):
        cfg=TrainConfig(epochs=1, steps_per_epoch=40, batch_size=4, crop=256, lr=lr, frozen_layers=2, bn='frozen', loss='ce+regiondice', seed=0, source_weights=(('corrections',0.7),('replay',0.3)))
        with tempfile.TemporaryDirectory() as t:
            r=train(corr+replay,[],t,cfg,init=ck,device='cpu')
        p=Predictor(r.model, ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
        print(G, lr, {n:{k:round(v-b[n][k],3) for k,v in ar.score(p, ss, None, ('ggo','infection')).items()} for n,ss in sets.items()}, flush=True)
