"""Downstream tasks on per-frame features (EVGAP's evaluation): features -> small task models.

  extract.py        a trained EVGAP encoder (frozen, from pre-training or any run with an 'encoder')
                    -> <out>/<recording>/<view>.npy per-frame features (CLI)
  annotations.py    feature folders, action segments (recording,start_frame,end_frame,action,verb,object),
                    splits, view selection (novel-view protocol), anticipation samples
  metrics.py        segmentation F1@{10,25,50}, edit score, frame accuracy; class-mean top-k recall
  mstcn.py          MS-TCN (multi-stage temporal convolution) and its loss
  c2ftcn.py         C2F-TCN (coarse-to-fine multi-resolution TCN, EVGAP's segmentation model) and its loss
  asformer.py       ASFormer (local-window attention encoder + decoders; EVGAP Table 2)
  ltcontext.py      LTContext (windowed + long-term sparse attention, multi-stage; EVGAP Table 2)
  tempagg.py        TempAgg (temporal aggregates of recent and spanning snippets, EVGAP's anticipation model)
  encoder_stack.py  +EVGAP: the pre-trained encoder under a task model, fine-tuned end to end
  views.py          view specs: single views, two-view inputs ('ego_0+exo_0'), split names for the table
  segmentation.py   temporal action segmentation: train, keep the best, evaluate (CLI)
  anticipation.py   action anticipation: verb / object / action heads, class-mean top-5 recall (CLI)
  loop.py           the compact Adam training loop both tasks share (epochs, best checkpoint, JSON)
  results.py        the paper-layout results table over the runs' results.json (CLI)
"""
