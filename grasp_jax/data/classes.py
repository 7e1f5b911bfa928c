"""Class lists of the chest X-ray datasets, in their label files' column order."""

# Holste et al. 2022 (VITA-Group/LongTailCXR), in their column order.
MIMIC_CXR_LT_CLASSES = (
    "No Finding", "Lung Opacity", "Cardiomegaly", "Atelectasis", "Pleural Effusion",
    "Support Devices", "Edema", "Pneumonia", "Pneumothorax", "Lung Lesion", "Fracture",
    "Enlarged Cardiomediastinum", "Consolidation", "Pleural Other", "Calcification of the Aorta",
    "Tortuous Aorta", "Pneumoperitoneum", "Subcutaneous Emphysema", "Pneumomediastinum")
NIH_CXR_LT_CLASSES = (
    "No Finding", "Infiltration", "Atelectasis", "Effusion", "Nodule", "Mass", "Pneumothorax",
    "Consolidation", "Pleural_Thickening", "Cardiomegaly", "Fibrosis", "Edema", "Tortuous Aorta",
    "Emphysema", "Pneumonia", "Calcification of the Aorta", "Pneumoperitoneum", "Hernia",
    "Subcutaneous Emphysema", "Pneumomediastinum")
# CXR-LT 2023 challenge (physionet cxr-lt-iccv-workshop-cvamd 1.1.0), alphabetical.
CXR_LT_2023_CLASSES = (
    "Atelectasis", "Calcification of the Aorta", "Cardiomegaly", "Consolidation", "Edema",
    "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fracture", "Hernia", "Infiltration",
    "Lung Lesion", "Lung Opacity", "Mass", "No Finding", "Nodule", "Pleural Effusion",
    "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum",
    "Pneumothorax", "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta")

# The class lists a label table is checked against, by TFDS dataset name (see grasp_jax.data.labels).
# ChestX-ray14's 15 labels and CheXpert's 14 are subsets of the NIH-CXR-LT and MIMIC-CXR-LT lists.
CLASS_LISTS = {
    "mimic_cxr_lt/cxr_lt_2022": MIMIC_CXR_LT_CLASSES,
    "mimic_cxr_lt/cxr_lt_2023": CXR_LT_2023_CLASSES,
    "nih_cxr_lt": NIH_CXR_LT_CLASSES,
}
