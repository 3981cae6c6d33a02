"""Evaluation harness: the published mIoU protocol of training-free CLIP segmentation (mmseg 1.x), without mmseg."""
