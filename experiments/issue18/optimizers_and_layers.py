import sys, tempfile, torch, json
sys.path.insert(0,'.')
import importlib.util
spec=importlib.util.spec_from_file_location('ar','experiments/adapt_recipes.py'); ar=importlib.util.module_from_spec(spec); spec.loader.exec_module(ar)
from DRSegUNetLib import default_model_path
from DRSegUNetLib.checkpoint import load_checkpoint
from DRSegUNetLib.config import InferenceConfig, TrainConfig
from DRSegUNetLib.data import read_zenodo_npz, resample_sample, read_medseg_folder
from DRSegUNetLib.inference import Predictor
from DRSegUNetLib.training import train
from DRSegUNetLib.adaptation import load_adaptation_data, adaptation_data_path
from dataclasses import replace
torch.set_num_threads(int(sys.argv[1]))
ck=load_checkpoint(default_model_path())
med=read_medseg_folder(ar.SHARED/'medseg'/'train50')
VAL=ar.MEDSEG_REF; TEST=["1","2","26","30","41","42","46","47","49","57"]
test=[s for s in med if s.name in TEST]; val=[s for s in med if s.name in VAL]
base=Predictor(ck.build_model(), ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
bt=ar.score(base, test, None, ('ggo','infection')); bv=ar.score(base, val, None, ('ggo','infection'))
data=load_adaptation_data(adaptation_data_path(default_model_path()))
z=read_zenodo_npz(ar.SHARED/'zenodo20'/'zenodo20_dev.npz', groups=[3])
idx=ar.evenly(len(z),5)
corr=[replace(resample_sample(z[i],(1.5,1.5),1.2),group='corrections') for i in idx]
rest=[z[i] for i in range(len(z)) if i not in idx][::3]
br=ar.score(base, rest, (1.5,1.5), ('infection',))
d=data.without_groups(['zenodo3'])
replay=[replace(resample_sample(s, d.spacing[s.name],1.2) if d.spacing.get(s.name) else s, group='replay') for s in d.replay]
print('base rest', br, 'test', bt, 'val', bv, flush=True)
R={'sgd1e-2':dict(optimizer='sgd',lr=1e-2), 'sgd3e-3':dict(optimizer='sgd',lr=3e-3), 'adam1e-4_dec':dict(lr=1e-4, frozen_layers=35), 'adam1e-4_bntrain':dict(lr=1e-4,bn='train')}
for name in sys.argv[2:]:
    kw=dict(epochs=1, steps_per_epoch=40, batch_size=4, crop=256, frozen_layers=2, bn='frozen', loss='ce+regiondice', seed=0, source_weights=(('corrections',0.7),('replay',0.3)))
    kw.update(R[name])
    with tempfile.TemporaryDirectory() as t:
        r=train(corr+replay,[],t,TrainConfig(**kw),init=ck,device='cpu')
    p=Predictor(r.model, ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
    a=ar.score(p, rest, (1.5,1.5), ('infection',)); t_=ar.score(p, test, None, ('ggo','infection')); v=ar.score(p, val, None, ('ggo','infection'))
    print(name, 'rest', round(a['infection']-br['infection'],3), 'test', {k:round(t_[k]-bt[k],3) for k in t_}, 'val', {k:round(v[k]-bv[k],3) for k in v}, flush=True)
