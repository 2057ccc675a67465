"""Models: USS feature extractors, segmentation nets, CAM classifiers; see ``registry``."""
