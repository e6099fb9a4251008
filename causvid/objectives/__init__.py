"""Training objectives of the core models, for the loop in `causvid.train`: each builds its
models and data, computes losses, writes samples, and exports a loadable (diffusers-format) result.

    autoencoder  object-weighted reconstruction of pixel clips, optionally against a discriminator
    teacher      flow matching of the bidirectional teacher on a latent bank
    vin          flow matching of long clips as parallel chunks, a Video Interface Network guiding the DiT
"""

from causvid.objectives.autoencoder import AutoencoderObjective
from causvid.objectives.teacher import TeacherObjective
from causvid.objectives.vin import VinObjective

OBJECTIVES = {"autoencoder": AutoencoderObjective, "teacher": TeacherObjective, "vin": VinObjective}

__all__ = ["OBJECTIVES", "AutoencoderObjective", "TeacherObjective", "VinObjective"]
