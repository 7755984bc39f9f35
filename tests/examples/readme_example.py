# The EVA-01 EVA-CLIP README usage example, verbatim except for the import line.
# The test fills in the two paths (left unquoted in the original README).
import torch
from eva_open_clip.compat import build_eva_model_and_transforms, tokenize
from PIL import Image

eva_clip_path = /path/to/eva_clip_psz14.pt
model_name = "EVA_CLIP_g_14"
image_path = /path/to/image.png
caption = ["a diagram", "a dog", "a cat"]

device = "cuda" if torch.cuda.is_available() else "cpu"
model, preprocess = build_eva_model_and_transforms(model_name, pretrained=eva_clip_path)

image = preprocess(Image.open(image_path)).unsqueeze(0).to(device)
text = tokenize(caption).to(device)

with torch.no_grad():
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)
    
    logits_per_image, logits_per_text = model(image, text)
    probs = logits_per_image.softmax(dim=-1).cpu().numpy()

print("Label probs:", probs)  # prints: [[0.9927937  0.00421068 0.00299572]]
