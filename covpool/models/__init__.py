"""timm models with covariance heads; importing this module registers them with timm.

Registered: ``resnet{18,34,50,101}_isqrtcov`` (iSQRT-COV ResNets) and
``vit_{tiny,small,base}_patch16_224_sovit`` (So-ViT). :func:`attach_head` converts any timm CNN or ViT.
"""

from covpool.models.attach import HEADS, CovPooledModel, attach_head
from covpool.models.isqrtcov_resnet import IsqrtCovResNet
from covpool.models.pretrained import create_timm_model
from covpool.models.sovit import SoViT

__all__ = ["HEADS", "CovPooledModel", "IsqrtCovResNet", "SoViT", "attach_head", "create_timm_model"]
