"""The registered model: images as people have them in, class names out.

Only this subpackage and what it imports travel with a registered model
(``classifier.tracking.registry``), so it must not import training or tracking code.
"""
