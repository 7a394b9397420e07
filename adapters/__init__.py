"""adapters: LoRA on peft (lora.py), LoRA files (lora_files.py, names in lora_keys.py), and
merge/unmerge/extract/resize (merge.py)."""
from .lora import (
                   TARGET_PRESETS,
                   Lora,
                   LoraModule,
                   LoraSpec,
                   add_lora,
                   enable_loras,
                   fit,
                   load_lora,
                   lora_from_model,
                   lora_names,
                   lora_spec,
                   lora_weights,
                   remove_lora,
                   set_lora_weights,
)
from .lora_files import FORMATS, convert_lora, load_lora_file, read_lora, save_lora, summarize, write_lora
from .merge import (
                   MergeRecord,
                   SvdReport,
                   combine_loras,
                   extract_lora,
                   merge_loras,
                   resize_lora,
                   save_merged,
                   unmerge,
)

__all__ = [
    "TARGET_PRESETS", "Lora", "LoraModule", "LoraSpec", "add_lora", "enable_loras", "fit", "load_lora",
    "lora_from_model", "lora_names", "lora_spec", "lora_weights", "remove_lora", "set_lora_weights",
    "FORMATS", "convert_lora", "load_lora_file", "read_lora", "save_lora", "summarize", "write_lora",
    "MergeRecord", "SvdReport", "combine_loras", "extract_lora", "merge_loras", "resize_lora",
    "save_merged", "unmerge",
]
