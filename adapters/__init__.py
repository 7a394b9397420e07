"""adapters: LoRA on peft (lora.py), LoRA files (lora_files.py, names in lora_keys.py), LyCORIS
adapters (LoHa, LoKr, DoRA: lycoris.py, column-wise DoRA layer lycoris_dora.py, files lycoris_files.py)
and merge/unmerge/extract/resize (merge.py)."""
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
from .lycoris import (
                   Lycoris,
                   LycorisModule,
                   LycorisSpec,
                   add_lycoris,
                   load_lycoris,
                   lycoris_from_model,
                   lycoris_spec,
                   remove_lycoris,
)
from .lycoris_files import (
                   convert_lycoris,
                   is_lycoris,
                   load_adapter_file,
                   read_adapter,
                   read_lycoris,
                   save_lycoris,
                   summarize_lycoris,
                   write_lycoris,
)
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
    "Lycoris", "LycorisModule", "LycorisSpec", "add_lycoris", "load_lycoris", "lycoris_from_model",
    "lycoris_spec", "remove_lycoris", "convert_lycoris", "is_lycoris", "load_adapter_file",
    "read_adapter",
    "read_lycoris",
    "save_lycoris", "summarize_lycoris", "write_lycoris",
    "MergeRecord", "SvdReport", "combine_loras", "extract_lora", "merge_loras", "resize_lora",
    "save_merged", "unmerge",
]
