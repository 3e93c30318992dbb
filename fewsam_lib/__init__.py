"""fewsam: few-shot fine-tuning of Segment Anything for anatomical segmentation, as a benchmark."""

from .errors import FewsamError

__version__ = "0.1.0"
__all__ = ["FewsamError", "__version__"]
