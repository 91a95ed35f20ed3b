import sys, re, collections
rows = collections.defaultdict(list)
tag = None
for line in open(sys.argv[1]):
    m = re.match(r"(base|new) t(\d) load=(\S+)", line)
    if m:
        tag = m.groups()
        if ":" not in line.split("|")[1]:
            continue
        line = "|" + line.split("|", 1)[1]
    cells = [c.strip() for c in line.split("|")]
    if len(cells) > 8 and ":" in cells[1] and tag:
        rows[(cells[1], tag[1], tag[0])].append((cells[7].replace(" ", ""), tag[2]))
for k in sorted(rows):
    print(f"{k[0]:16s} threads {k[1]} {k[2]:4s}: " + ", ".join(f"{r} (load {l})" for r, l in rows[k]))
