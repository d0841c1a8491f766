exec(open('experiments/issue18/ce_vs_lr_zero.py').read().split("print('base'")[0])
from DRSegUNetLib.metrics import MetricAccumulator
import numpy as np
def sc(p, ss, sp):
    acc=MetricAccumulator(('infection',))
    area=0
    for s in ss:
        lab=p.predict_slices([s.hu], spacing=sp, eight_bit=True)[0]; area+=np.isin(lab,(1,2)).sum()
        acc.add(s.name, lab, {r:s.region_truth(r) for r in ('infection',)})
    sm=acc.summary(); return {r:(round(v['mean']['dice'],3), round(v['mean']['precision'],3), round(v['mean']['recall'],3)) for r,v in sm.items()}, area
corr1=[replace(c, group='zenodo3') for c in corr]
noaug=AugmentConfig(rotate_deg=0, scale=(1,1), flip_lr=0, hu_gain=(1,1), hu_shift=0, gamma=(1,1), noise_hu=0, blur_sigma=0)
for name,aug,loss,crop in [('aug-regiondice-1e-4',AugmentConfig(),'ce+regiondice',256)]:
    losses=[]
    cfg=TrainConfig(epochs=1, steps_per_epoch=40, batch_size=4, crop=crop, lr=1e-4, frozen_layers=2, bn='frozen', loss=loss)
    with tempfile.TemporaryDirectory() as t:
        r=train(corr,[],t,cfg,init=ck,device='cpu', augment=aug, progress=lambda st,s,tot,m='',**k: losses.append(round(k.get('loss',-1),3)) if st=='train' else None)
    print(name, losses[::4])
    p=Predictor(r.model, ck.config,'cpu',InferenceConfig(pixel_mm=1.2))
    print(name,'train', sc(p, corr1, None))
