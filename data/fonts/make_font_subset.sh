#!/usr/bin/env bash
# Cuts DejaVuSans-Latin1.ttf, the font `sdengine plot` compiles in (src/train/plot.rs), from
# DejaVu Sans 2.37 (Debian package fonts-dejavu-core: /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf,
# md5 4cc160d1da14d4598cef75f69c3c6385). Keeps printable ASCII and Latin-1 (U+0020-007E,
# U+00A0-00FF) and drops hinting and OpenType layout, 757 KB -> 26 KB. Needs fonttools
# (`pip install fonttools`; 4.68.0 was used). The licence (LICENSE-DejaVu.txt) allows modified
# copies whose names contain neither "Bitstream" nor "Vera"; the family name stays "DejaVu Sans".
set -euo pipefail
src=${1:-/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf}
cd "$(dirname "$0")"
pyftsubset "$src" --unicodes="U+0020-007E,U+00A0-00FF" --no-hinting --layout-features='' \
  --name-IDs='*' --output-file=DejaVuSans-Latin1.ttf
md5sum DejaVuSans-Latin1.ttf
