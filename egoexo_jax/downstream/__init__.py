"""Downstream tasks on per-frame features (EVGAP's evaluation): features -> small task models.

  extract.py        a trained EVGAP encoder (frozen, from pre-training or any run with an 'encoder')
                    -> <out>/<recording>/<view>.npy per-frame features (CLI)
  annotations.py    feature folders, action segments (recording,start_frame,end_frame,action,verb,object),
                    splits, view selection (novel-view protocol), anticipation samples
  metrics.py        segmentation F1@{10,25,50}, edit score, frame accuracy; class-mean top-k recall
  mstcn.py          MS-TCN (multi-stage temporal convolution) and its loss
  segmentation.py   temporal action segmentation: train, keep the best, evaluate (CLI)
  anticipation.py   action anticipation: verb / object / action heads, class-mean top-5 recall (CLI)
  loop.py           the compact Adam training loop both tasks share (epochs, best checkpoint, JSON)
"""
