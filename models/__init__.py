"""Model zoo: plain-N (TAKD plain CNNs), resnet-N (CIFAR ResNets), air-N (airbench-style VGG), tv:<name> (torchvision)."""
from models import airnet, plain, resnet, torchvision_models  # noqa: F401  (registers builders)
from models.features import feature_names, with_features
from models.profile import profile
from models.registry import UnknownModelError, available, build_model, check_name

__all__ = ["UnknownModelError", "available", "build_model", "check_name", "feature_names", "profile", "with_features"]
