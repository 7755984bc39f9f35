"""The plugin alone: importing eva_open_clip and loading a model through open_clip import nothing of the
embedding tool or the command line (nor their readers, webdataset and pyarrow)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from support.checkpoints import golden, released_state_dict

CODE = '''
import json, sys
import eva_open_clip, open_clip
eva_open_clip.register_eva_model('alone', json.load(open(sys.argv[1])))
model, _, preprocess = open_clip.create_model_and_transforms('alone', pretrained=sys.argv[2])
tool = ('eva_open_clip.embed', 'eva_open_clip.cli', 'webdataset', 'pyarrow')
print(json.dumps(sorted(m for m in sys.modules if m.startswith(tool))))
'''


def test_the_plugin_never_imports_the_tool(tmp_path):
    (tmp_path / 'tiny.json').write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), tmp_path / 'tiny.pt')
    result = subprocess.run([sys.executable, '-c', CODE, str(tmp_path / 'tiny.json'), str(tmp_path / 'tiny.pt')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
