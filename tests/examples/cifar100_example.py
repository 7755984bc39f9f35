# The EVA-01 EVA-CLIP README zero-shot example, verbatim except for the import line (`import clip`).
# The test fills in the checkpoint path and replaces the CIFAR-100 download with a small in-memory dataset.
import os
import eva_open_clip.compat as clip
import torch
from torchvision.datasets import CIFAR100

# Load the model
eva_clip_path = /path/to/eva_clip_psz14.pt

device = "cuda" if torch.cuda.is_available() else "cpu"
model, preprocess = clip.create_model_and_transforms('EVA_CLIP_g_14', eva_clip_path)

model = model.to(device)
model.eval()

# Download the dataset
cifar100 = CIFAR100(root=os.path.expanduser("~/.cache"), download=True, train=False)

# Prepare the inputs
image, class_id = cifar100[3637]
image_input = preprocess(image).unsqueeze(0).to(device)
text_inputs = torch.cat([clip.tokenize(f"a photo of a {c}") for c in cifar100.classes]).to(device)

# Calculate features
with torch.no_grad():
    image_features = model.encode_image(image_input)
    text_features = model.encode_text(text_inputs)

# Pick the top 5 most similar labels for the image
image_features /= image_features.norm(dim=-1, keepdim=True)
text_features /= text_features.norm(dim=-1, keepdim=True)
similarity = (100.0 * image_features @ text_features.T).softmax(dim=-1)
values, indices = similarity[0].topk(5)

# Print the result
print("\nTop predictions:\n")
for value, index in zip(values, indices):
    print(f"{cifar100.classes[index]:>16s}: {100 * value.item():.2f}%")
