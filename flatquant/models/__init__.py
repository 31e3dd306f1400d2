"""Model knowledge: the family registry (site map) and loading a model by name, folder, .gguf or hub id."""
from flatquant.models.families import FAMILIES, Family, family_for, supported_model_types
from flatquant.models.loading import default_dtype, load_model

__all__ = ["FAMILIES", "Family", "default_dtype", "family_for", "load_model", "supported_model_types"]
