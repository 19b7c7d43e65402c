//! The shape of `src/`: no import cycle between files, none between the
//! folders of a layer, and every import points down the layers
//! (`vmm -> mmu -> mm -> notifier`, see docs/design.md). Leaf modules (the
//! trace-event schema, the synchronization shim) import no project module
//! and may be imported by every layer.
//!
//! The check parses every file of the library and the binary with `syn`,
//! builds the module tree (`mod` declarations, `#[path]`, inline modules),
//! and resolves every `use` and every path in code and in macro bodies
//! (`crate::`, `self::`, `super::super::`, names a `use` bound, names a glob
//! brought in) to the file that *defines* the item, following `pub use`
//! re-exports. A re-export is a module's public face, not a dependency of
//! the re-exporting file: only uses count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Top-level modules, lowest layer first: a file may import files of its
/// own layer and of the layers before it. The binary (`main.rs` and its
/// modules) sits above all of them.
const LAYERS: &[&[&str]] = &[
    &["notifier"],
    &["mm"],
    // Two secondary MMUs on the same mm: neither may import the other.
    &["mmu", "dma"],
    &["vmm"],
    &["scenario"],
];

/// Leaf modules: they import no project module; every layer may import
/// them.
const LEAVES: &[&str] = &["sync", "trace"];

/// Cycles known and left to fix, each the exact set of files of one
/// strongly connected component. Anything else fails.
const TOLERATED_CYCLES: &[&[&str]] = &[];

/// A module of the crate (a file, or an inline `mod` inside one).
#[derive(Debug)]
struct Module {
    parent: Option<usize>,
    /// The crate root this module belongs to.
    root: usize,
    /// The file that holds it.
    file: usize,
    children: BTreeMap<String, usize>,
    /// Names of the items defined here (types, functions, constants, ...).
    items: BTreeSet<String>,
    uses: Vec<UseBinding>,
}

/// One name a `use` binds (`*` for a glob).
#[derive(Debug)]
struct UseBinding {
    name: String,
    path: Vec<String>,
    public: bool,
    line: usize,
}

/// A source file.
struct SrcFile {
    /// Relative to the source root.
    path: PathBuf,
    /// The module the file is the root of.
    module: usize,
    /// Whether it belongs to the binary crate.
    bin: bool,
    ast: syn::File,
}

/// An import: `from` names an item `to` defines, at `line` of `from`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: usize,
    to: usize,
    line: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Module(usize),
    /// An item defined in this file.
    Item(usize),
    /// Outside the project (std, a dependency, a local binding).
    External,
}

/// The parsed source tree and its import edges.
#[derive(Default)]
struct Tree {
    root: PathBuf,
    files: Vec<SrcFile>,
    modules: Vec<Module>,
    lib_root: Option<usize>,
    edges: BTreeSet<Edge>,
}

impl Tree {
    /// Parses the library (`lib.rs`) and, if present, the binary
    /// (`main.rs`) under `root`, and resolves every import.
    fn load(root: &Path) -> Result<Tree, String> {
        let mut t = Tree {
            root: root.to_path_buf(),
            ..Tree::default()
        };
        t.lib_root = Some(t.load_crate(Path::new("lib.rs"), false)?);
        if root.join("main.rs").exists() {
            t.load_crate(Path::new("main.rs"), true)?;
        }
        t.resolve_all();
        Ok(t)
    }

    fn load_crate(&mut self, rel: &Path, bin: bool) -> Result<usize, String> {
        let id = self.modules.len();
        self.modules.push(Module {
            parent: None,
            root: id,
            file: 0,
            children: BTreeMap::new(),
            items: BTreeSet::new(),
            uses: Vec::new(),
        });
        self.load_file(id, rel, bin)?;
        Ok(id)
    }

    /// Parses `rel` as the file of module `module`.
    fn load_file(&mut self, module: usize, rel: &Path, bin: bool) -> Result<(), String> {
        let full = self.root.join(rel);
        let text = std::fs::read_to_string(&full)
            .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
        let ast = syn::parse_file(&text).map_err(|e| format!("{}: {e}", rel.display()))?;
        let file = self.files.len();
        self.modules[module].file = file;
        let items = ast.items.clone();
        self.files.push(SrcFile {
            path: rel.to_path_buf(),
            module,
            bin,
            ast,
        });
        // Where `mod x;` finds x: next to lib.rs/main.rs/mod.rs, else in
        // a folder named after the file.
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let child_dir = if matches!(name, "lib.rs" | "main.rs" | "mod.rs") {
            dir.clone()
        } else {
            dir.join(rel.file_stem().unwrap_or_default())
        };
        self.collect(module, &items, &dir, &child_dir, bin)
    }

    fn collect(
        &mut self,
        module: usize,
        items: &[syn::Item],
        file_dir: &Path,
        child_dir: &Path,
        bin: bool,
    ) -> Result<(), String> {
        for item in items {
            let name = match item {
                syn::Item::Mod(m) => {
                    let name = m.ident.to_string();
                    let id = self.modules.len();
                    let root = self.modules[module].root;
                    self.modules.push(Module {
                        parent: Some(module),
                        root,
                        file: self.modules[module].file,
                        children: BTreeMap::new(),
                        items: BTreeSet::new(),
                        uses: Vec::new(),
                    });
                    self.modules[module].children.insert(name.clone(), id);
                    let path_attr = m.attrs.iter().find_map(|a| match &a.meta {
                        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
                            syn::Expr::Lit(syn::ExprLit {
                                lit: syn::Lit::Str(s),
                                ..
                            }) => Some(s.value()),
                            _ => None,
                        },
                        _ => None,
                    });
                    match (&m.content, path_attr) {
                        (Some((_, inner)), _) => {
                            let sub = child_dir.join(&name);
                            self.collect(id, inner, &sub, &sub, bin)?;
                        }
                        (None, Some(p)) => self.load_file(id, &file_dir.join(p), bin)?,
                        (None, None) => {
                            let flat = child_dir.join(format!("{name}.rs"));
                            let nested = child_dir.join(&name).join("mod.rs");
                            let rel = if self.root.join(&flat).exists() {
                                flat
                            } else {
                                nested
                            };
                            self.load_file(id, &rel, bin)?;
                        }
                    }
                    continue;
                }
                syn::Item::Use(u) => {
                    let public = !matches!(u.vis, syn::Visibility::Inherited);
                    let mut out = Vec::new();
                    flatten_use(&u.tree, &mut Vec::new(), &mut out);
                    for (name, path, line) in out {
                        self.modules[module].uses.push(UseBinding {
                            name,
                            path,
                            public,
                            line,
                        });
                    }
                    continue;
                }
                syn::Item::Const(i) => i.ident.to_string(),
                syn::Item::Enum(i) => i.ident.to_string(),
                syn::Item::ExternCrate(i) => i.ident.to_string(),
                syn::Item::Fn(i) => i.sig.ident.to_string(),
                syn::Item::Macro(i) => match &i.ident {
                    Some(id) => id.to_string(),
                    None => continue,
                },
                syn::Item::Static(i) => i.ident.to_string(),
                syn::Item::Struct(i) => i.ident.to_string(),
                syn::Item::Trait(i) => i.ident.to_string(),
                syn::Item::TraitAlias(i) => i.ident.to_string(),
                syn::Item::Type(i) => i.ident.to_string(),
                syn::Item::Union(i) => i.ident.to_string(),
                _ => continue,
            };
            self.modules[module].items.insert(name);
        }
        Ok(())
    }

    /// Resolves `path` as written in module `from`.
    fn resolve(&self, from: usize, path: &[String], depth: u32) -> Target {
        if depth > 32 || path.is_empty() {
            return Target::External;
        }
        let m = &self.modules[from];
        let (mut cur, mut rest) = match path[0].as_str() {
            "crate" | "$crate" => (m.root, &path[1..]),
            "self" => (from, &path[1..]),
            "super" => {
                let mut cur = from;
                let mut i = 0;
                while path.get(i).is_some_and(|s| s == "super") {
                    match self.modules[cur].parent {
                        Some(p) => cur = p,
                        None => return Target::External,
                    }
                    i += 1;
                }
                (cur, &path[i..])
            }
            "shadowvm" if self.files[m.file].bin => match self.lib_root {
                Some(lib) => (lib, &path[1..]),
                None => return Target::External,
            },
            first => match self.lookup(from, first, depth + 1) {
                Target::Module(next) => (next, &path[1..]),
                other => return other,
            },
        };
        while let Some(seg) = rest.first() {
            match self.lookup(cur, seg, depth + 1) {
                Target::Module(next) => cur = next,
                other => return other,
            }
            rest = &rest[1..];
        }
        Target::Module(cur)
    }

    /// What `name` means inside module `module`.
    fn lookup(&self, module: usize, name: &str, depth: u32) -> Target {
        let m = &self.modules[module];
        if let Some(&c) = m.children.get(name) {
            return Target::Module(c);
        }
        if m.items.contains(name) {
            return Target::Item(m.file);
        }
        for u in m.uses.iter().filter(|u| u.name == name) {
            match self.resolve(module, &u.path, depth + 1) {
                Target::External => {}
                t => return t,
            }
        }
        for u in m.uses.iter().filter(|u| u.name == "*") {
            if let Target::Module(g) = self.resolve(module, &u.path, depth + 1)
                && g != module
            {
                match self.lookup(g, name, depth + 1) {
                    Target::External => {}
                    t => return t,
                }
            }
        }
        Target::External
    }

    fn edge(&mut self, from_module: usize, path: &[String], line: usize) {
        let from = self.modules[from_module].file;
        if let Target::Item(to) = self.resolve(from_module, path, 0)
            && to != from
        {
            self.edges.insert(Edge { from, to, line });
        }
    }

    fn resolve_all(&mut self) {
        // `use` declarations: private ones are dependencies, `pub` ones are
        // re-exports (followed by `resolve`, not counted).
        for m in 0..self.modules.len() {
            let uses: Vec<(Vec<String>, usize)> = self.modules[m]
                .uses
                .iter()
                .filter(|u| !u.public && u.name != "*")
                .map(|u| (u.path.clone(), u.line))
                .collect();
            for (path, line) in uses {
                self.edge(m, &path, line);
            }
        }
        // Paths in code and in macro bodies.
        for f in 0..self.files.len() {
            let mut v = PathCollector {
                tree: self,
                stack: vec![self.files[f].module],
                found: Vec::new(),
            };
            v.visit_file(&self.files[f].ast);
            for (m, path, line) in std::mem::take(&mut v.found) {
                self.edge(m, &path, line);
            }
        }
    }

    fn name(&self, file: usize) -> String {
        self.files[file].path.display().to_string()
    }

    /// The top-level module a file belongs to (`vmm` for
    /// `vmm/kvm/vm.rs`), `bin` for the binary, `` for `lib.rs`.
    fn layer_of(&self, file: usize) -> String {
        let f = &self.files[file];
        if f.bin {
            return "bin".into();
        }
        let mut parts = f.path.components();
        match (parts.next(), parts.next()) {
            (Some(first), Some(_)) => first.as_os_str().to_string_lossy().into_owned(),
            (Some(first), None) => match first.as_os_str().to_string_lossy().as_ref() {
                "lib.rs" => String::new(),
                name => name.trim_end_matches(".rs").to_string(),
            },
            _ => String::new(),
        }
    }

    /// Whether `root` is a folder's root file (`lib.rs`, `mod.rs`) and
    /// `file` lies in that folder.
    fn contains(&self, root: usize, file: usize) -> bool {
        let r = &self.files[root].path;
        let name = r.file_name().and_then(|n| n.to_str()).unwrap_or("");
        matches!(name, "lib.rs" | "mod.rs")
            && self.files[root].bin == self.files[file].bin
            && self.files[file]
                .path
                .starts_with(r.parent().unwrap_or(Path::new("")))
    }

    /// The folder a file stands for in the folder graph: its first folder
    /// below the layer's own (`vmm/kvm` for `vmm/kvm/vm.rs`), or the file
    /// itself at a layer's top (`vmm/abi.rs`).
    fn unit_of(&self, file: usize) -> String {
        let comps: Vec<String> = self.files[file]
            .path
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if comps.len() > 2 {
            comps[..2].join("/")
        } else {
            comps.join("/")
        }
    }
}

/// `use a::{b, c::d as e, f::*}` into (bound name, path, line) triples.
fn flatten_use(
    tree: &syn::UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(String, Vec<String>, usize)>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let line = n.ident.span().start().line;
            if n.ident == "self" {
                let name = prefix.last().cloned().unwrap_or_default();
                out.push((name, prefix.clone(), line));
            } else {
                let mut p = prefix.clone();
                p.push(n.ident.to_string());
                out.push((n.ident.to_string(), p, line));
            }
        }
        syn::UseTree::Rename(r) => {
            let line = r.ident.span().start().line;
            let mut p = prefix.clone();
            if r.ident != "self" {
                p.push(r.ident.to_string());
            }
            out.push((r.rename.to_string(), p, line));
        }
        syn::UseTree::Glob(g) => {
            let line = g.star_token.spans[0].start().line;
            out.push(("*".into(), prefix.clone(), line));
        }
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix, out);
            }
        }
    }
}

/// Collects every path in code (and the paths in macro bodies), with the
/// module it is written in.
struct PathCollector<'a> {
    tree: &'a Tree,
    stack: Vec<usize>,
    found: Vec<(usize, Vec<String>, usize)>,
}

impl PathCollector<'_> {
    fn current(&self) -> usize {
        *self.stack.last().unwrap_or(&0)
    }

    /// `a::b::c` runs in a token stream; single names only when they start
    /// with `crate`, `self` or `super`.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                TokenTree::Group(g) => {
                    self.scan_tokens(g.stream());
                    i += 1;
                }
                TokenTree::Ident(id) => {
                    let preceded_by_path_sep =
                        i >= 1 && matches!(&tts[i - 1], TokenTree::Punct(p) if p.as_char() == ':');
                    let dollar =
                        i >= 1 && matches!(&tts[i - 1], TokenTree::Punct(p) if p.as_char() == '$');
                    let mut path = vec![if dollar {
                        format!("${id}")
                    } else {
                        id.to_string()
                    }];
                    let line = id.span().start().line;
                    let mut j = i + 1;
                    while j + 2 < tts.len()
                        && matches!(&tts[j], TokenTree::Punct(p) if p.as_char() == ':')
                        && matches!(&tts[j + 1], TokenTree::Punct(p) if p.as_char() == ':')
                    {
                        match &tts[j + 2] {
                            TokenTree::Ident(next) => {
                                path.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    let rooted = matches!(path[0].as_str(), "crate" | "$crate" | "self" | "super");
                    if !preceded_by_path_sep && (path.len() > 1 || rooted) {
                        self.found.push((self.current(), path, line));
                    }
                    i = j.max(i + 1);
                }
                _ => i += 1,
            }
        }
    }
}

impl<'ast> Visit<'ast> for PathCollector<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let Some((_, items)) = &m.content else { return };
        let cur = self.current();
        let Some(&child) = self.tree.modules[cur].children.get(&m.ident.to_string()) else {
            return;
        };
        self.stack.push(child);
        for item in items {
            self.visit_item(item);
        }
        self.stack.pop();
    }

    // `use` declarations are handled from the module table.
    fn visit_item_use(&mut self, _: &'ast syn::ItemUse) {}

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() && !p.segments.is_empty() {
            let path: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            let line = p.segments[0].ident.span().start().line;
            self.found.push((self.current(), path, line));
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.scan_tokens(m.tokens.clone());
    }

    // Attributes name derive macros and tool attributes, never project items.
    fn visit_attribute(&mut self, _: &'ast syn::Attribute) {}
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(nodes: usize, edges: &BTreeSet<(usize, usize)>) -> Vec<Vec<usize>> {
    struct State<'a> {
        adj: Vec<Vec<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: &'a mut Vec<Vec<usize>>,
    }
    fn connect(s: &mut State<'_>, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for w in s.adj[v].clone() {
            match s.index[w] {
                None => {
                    connect(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort_unstable();
                s.out.push(comp);
            }
        }
    }
    let mut adj = vec![Vec::new(); nodes];
    for &(a, b) in edges {
        if a != b {
            adj[a].push(b);
        }
    }
    let mut out = Vec::new();
    let mut s = State {
        adj,
        index: vec![None; nodes],
        low: vec![0; nodes],
        on_stack: vec![false; nodes],
        stack: Vec::new(),
        next: 0,
        out: &mut out,
    };
    for v in 0..nodes {
        if s.index[v].is_none() {
            connect(&mut s, v);
        }
    }
    out
}

/// One shortest cycle through the first node of `comp`, as node indices.
fn one_cycle(comp: &[usize], edges: &BTreeSet<(usize, usize)>) -> Vec<usize> {
    let start = comp[0];
    let inside: BTreeSet<usize> = comp.iter().copied().collect();
    let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &(a, b) in edges.iter().filter(|(a, b)| *a == v && inside.contains(b)) {
            if b == start {
                let mut path = vec![a];
                let mut cur = a;
                while cur != start {
                    cur = prev[&cur];
                    path.push(cur);
                }
                path.reverse();
                return path;
            }
            if b != start && !prev.contains_key(&b) {
                prev.insert(b, a);
                queue.push_back(b);
            }
        }
    }
    comp.to_vec()
}

/// Everything wrong with the tree, one line each.
fn problems(t: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let at = |from: usize, to: usize| {
        t.edges
            .iter()
            .find(|e| e.from == from && e.to == to)
            .map_or(0, |e| e.line)
    };

    // Files. A folder's root file (`mod.rs`, `lib.rs`) using the files of
    // its own folder is containment, not an import: the root assembles its
    // parts (`Mm` holds a `VmaTree` and `PageTables`) while the parts use
    // the root's shared declarations (`Hva`, `Pfn`, `Mm`), the way a C
    // subsystem's header and its .c files relate. Only that direction is
    // exempt; the parts among themselves, and every folder among the
    // others, must form no cycle.
    let counted: Vec<&Edge> = t
        .edges
        .iter()
        .filter(|e| !t.contains(e.from, e.to))
        .collect();
    let file_edges: BTreeSet<(usize, usize)> = counted.iter().map(|e| (e.from, e.to)).collect();
    for comp in cycles(t.files.len(), &file_edges) {
        let names: BTreeSet<String> = comp.iter().map(|&f| t.name(f)).collect();
        if TOLERATED_CYCLES
            .iter()
            .any(|c| c.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>() == names)
        {
            continue;
        }
        let c = one_cycle(&comp, &file_edges);
        let mut steps: Vec<String> = c
            .windows(2)
            .map(|w| format!("{}:{} -> {}", t.name(w[0]), at(w[0], w[1]), t.name(w[1])))
            .collect();
        if let (Some(&last), Some(&first)) = (c.last(), c.first()) {
            steps.push(format!(
                "{}:{} -> {}",
                t.name(last),
                at(last, first),
                t.name(first)
            ));
        }
        out.push(format!("import cycle between files: {}", steps.join(", ")));
    }

    // Folders (a layer's sub-folders, and the files at its top).
    let mut units: Vec<String> = (0..t.files.len()).map(|f| t.unit_of(f)).collect();
    units.sort();
    units.dedup();
    let unit_id = |f: usize| units.iter().position(|u| *u == t.unit_of(f)).unwrap_or(0);
    let mut unit_edges = BTreeSet::new();
    let mut witness: BTreeMap<(usize, usize), &&Edge> = BTreeMap::new();
    for e in &counted {
        let (a, b) = (unit_id(e.from), unit_id(e.to));
        if a != b {
            unit_edges.insert((a, b));
            witness.entry((a, b)).or_insert(e);
        }
    }
    for comp in cycles(units.len(), &unit_edges) {
        let names: BTreeSet<String> = comp.iter().map(|&u| units[u].clone()).collect();
        // A cycle of single files is the file cycle reported above.
        if names.iter().all(|n| n.ends_with(".rs"))
            || TOLERATED_CYCLES
                .iter()
                .any(|c| c.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>() == names)
        {
            continue;
        }
        let c = one_cycle(&comp, &unit_edges);
        let mut ring = c.clone();
        ring.push(c[0]);
        let steps: Vec<String> = ring
            .windows(2)
            .map(|w| {
                let e = witness[&(w[0], w[1])];
                format!(
                    "{} -> {} ({}:{})",
                    units[w[0]],
                    units[w[1]],
                    t.name(e.from),
                    e.line
                )
            })
            .collect();
        out.push(format!(
            "import cycle between folders: {}",
            steps.join(", ")
        ));
    }

    // Layers.
    let rank = |l: &str| -> Option<usize> {
        if l == "bin" {
            return Some(LAYERS.len());
        }
        LAYERS.iter().position(|x| x.contains(&l))
    };
    for e in &t.edges {
        let (la, lb) = (t.layer_of(e.from), t.layer_of(e.to));
        let where_ = format!("{}:{} imports {}", t.name(e.from), e.line, t.name(e.to));
        if la.is_empty() || la == lb {
            continue;
        }
        let (leaf_a, leaf_b) = (LEAVES.contains(&la.as_str()), LEAVES.contains(&lb.as_str()));
        if leaf_a {
            out.push(format!(
                "{where_}: the leaf module `{la}` must import no project module"
            ));
            continue;
        }
        if leaf_b {
            continue;
        }
        match (rank(&la), rank(&lb)) {
            (Some(ra), Some(rb)) if ra > rb => {}
            (Some(ra), Some(rb)) if ra == rb => out.push(format!(
                "{where_}: `{la}` and `{lb}` are layers of the same rank and may not import each other"
            )),
            (Some(_), Some(_)) => out.push(format!(
                "{where_}: the lower layer `{la}` imports the higher layer `{lb}`"
            )),
            _ => out.push(format!(
                "{where_}: `{la}` or `{lb}` is in neither LAYERS nor LEAVES of tests/layering.rs"
            )),
        }
    }
    out
}

#[test]
fn src_has_no_import_cycles_and_every_import_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let t = Tree::load(&src).unwrap_or_else(|e| panic!("{e}"));
    assert!(t.files.len() > 50, "only {} files found", t.files.len());
    assert!(
        t.edges.len() > 100,
        "only {} imports found: the resolver lost track",
        t.edges.len()
    );
    let p = problems(&t);
    assert!(p.is_empty(), "{} problems:\n{}", p.len(), p.join("\n"));
}

/// A throw-away source tree in a temporary folder.
fn synthetic(name: &str, files: &[(&str, &str)]) -> Tree {
    let dir = std::env::temp_dir().join(format!("shadowvm-layering-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }
    let t = Tree::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&dir);
    t
}

/// The (from, to) file pairs of the edges, by path.
fn edge_names(t: &Tree) -> BTreeSet<(String, String)> {
    t.edges
        .iter()
        .map(|e| (t.name(e.from), t.name(e.to)))
        .collect()
}

#[test]
fn a_cycle_between_two_files_is_found() {
    let t = synthetic(
        "cycle",
        &[
            ("lib.rs", "pub mod mm;"),
            ("mm/mod.rs", "mod a;\nmod b;\n"),
            ("mm/a.rs", "use super::b::B;\npub struct A(B);\n"),
            // Only a path in code, no `use`.
            (
                "mm/b.rs",
                "pub struct B;\nfn f() -> Option<crate::mm::a::A> { None }\n",
            ),
        ],
    );
    let p = problems(&t);
    assert!(
        p.iter().any(|l| l
            .starts_with("import cycle between files: mm/a.rs:1 -> mm/b.rs, mm/b.rs:2 -> mm/a.rs")),
        "{p:#?}"
    );
}

#[test]
fn reexports_groups_and_nested_super_resolve_to_the_defining_file() {
    let t = synthetic(
        "resolve",
        &[
            ("lib.rs", "pub mod vmm;\npub mod trace;\n"),
            ("trace.rs", "pub struct Event;\n"),
            (
                "vmm/mod.rs",
                "pub mod kvm;\npub mod run;\npub use kvm::vm::{Vm, VmError as Error};\n",
            ),
            ("vmm/kvm/mod.rs", "pub mod vm;\npub mod kick;\n"),
            ("vmm/kvm/vm.rs", "pub struct Vm;\npub enum VmError {}\n"),
            (
                "vmm/kvm/kick.rs",
                "pub mod inner { pub fn f() { let _ = super::super::vm::Vm; } }\n",
            ),
            (
                "vmm/run.rs",
                "use super::{Error, kvm::kick::{self}};\n\
                 use crate::trace as t;\n\
                 fn f(_: Error) { kick::inner::f(); let _: Option<t::Event> = None; }\n\
                 macro_rules! m { () => { $crate::vmm::Vm } }\n\
                 fn g() { let _ = m!(); tracing::debug!(\"{}\", crate::vmm::kvm::vm::Vm); }\n",
            ),
        ],
    );
    let want: BTreeSet<(String, String)> = [
        ("vmm/kvm/kick.rs", "vmm/kvm/vm.rs"),
        // `Error` comes through vmm/mod.rs's `pub use ... as Error`.
        ("vmm/run.rs", "vmm/kvm/vm.rs"),
        ("vmm/run.rs", "vmm/kvm/kick.rs"),
        ("vmm/run.rs", "trace.rs"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(edge_names(&t), want);
    assert!(problems(&t).is_empty(), "{:#?}", problems(&t));
}

#[test]
fn layers_of_the_same_rank_may_not_import_each_other() {
    let t = synthetic(
        "peers",
        &[
            ("lib.rs", "pub mod mm;\npub mod mmu;\npub mod dma;\n"),
            ("mm.rs", "pub struct Mm;\n"),
            ("mmu.rs", "pub struct Mmu(crate::mm::Mm);\n"),
            ("dma.rs", "pub struct Dma(crate::mmu::Mmu);\n"),
        ],
    );
    let p = problems(&t);
    assert_eq!(
        p,
        vec![
            "dma.rs:1 imports mmu.rs: `dma` and `mmu` are layers of the same rank and may not import each other"
        ],
        "{p:#?}"
    );
}

#[test]
fn an_upward_import_and_a_leaf_that_imports_are_refused() {
    let t = synthetic(
        "layers",
        &[
            ("lib.rs", "pub mod mm;\npub mod vmm;\npub mod trace;\n"),
            (
                "mm.rs",
                "pub struct Mm;\nfn f() { let _ = crate::vmm::Vm; }\n",
            ),
            ("vmm.rs", "pub struct Vm(crate::mm::Mm);\n"),
            (
                "trace.rs",
                "pub fn f() -> crate::mm::Mm { crate::mm::Mm }\n",
            ),
        ],
    );
    let p = problems(&t);
    assert!(
        p.iter()
            .any(|l| l
                == "mm.rs:2 imports vmm.rs: the lower layer `mm` imports the higher layer `vmm`"),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("trace.rs:1 imports mm.rs: the leaf module `trace`")),
        "{p:#?}"
    );
}

#[test]
fn a_cycle_between_folders_is_found() {
    let t = synthetic(
        "folders",
        &[
            ("lib.rs", "pub mod vmm;"),
            ("vmm/mod.rs", "pub mod kvm;\npub mod paging;\n"),
            ("vmm/kvm/mod.rs", "pub mod vm;\npub mod vcpu;\n"),
            ("vmm/kvm/vm.rs", "pub struct Vm;\n"),
            (
                "vmm/kvm/vcpu.rs",
                "pub fn run(_: &crate::vmm::paging::ops::Ops) {}\n",
            ),
            ("vmm/paging/mod.rs", "pub mod ops;\n"),
            (
                "vmm/paging/ops.rs",
                "pub struct Ops(crate::vmm::kvm::vm::Vm);\n",
            ),
        ],
    );
    let p = problems(&t);
    assert!(
        p.iter()
            .any(|l| l.starts_with("import cycle between folders: vmm/kvm -> vmm/paging")),
        "{p:#?}"
    );
    assert!(!p.iter().any(|l| l.contains("between files")), "{p:#?}");
}

#[test]
fn a_folder_root_may_use_its_parts_but_the_parts_no_cycle() {
    let t = synthetic(
        "root",
        &[
            ("lib.rs", "pub mod mm;"),
            (
                "mm/mod.rs",
                "mod vma;\nmod ksm;\npub type Hva = u64;\npub struct Mm(vma::Vma);\n",
            ),
            ("mm/vma.rs", "pub struct Vma(super::Hva);\n"),
            ("mm/ksm.rs", "fn f(_: &super::Mm) {}\n"),
        ],
    );
    assert!(problems(&t).is_empty(), "{:#?}", problems(&t));
    let t = synthetic(
        "siblings",
        &[
            ("lib.rs", "pub mod mm;"),
            ("mm/mod.rs", "mod vma;\nmod ksm;\npub type Hva = u64;\n"),
            (
                "mm/vma.rs",
                "pub struct Vma(super::Hva);\nfn f() { super::ksm::g(); }\n",
            ),
            ("mm/ksm.rs", "pub fn g() {}\nfn h(_: super::vma::Vma) {}\n"),
        ],
    );
    let p = problems(&t);
    assert!(
        p.iter()
            .any(|l| l.starts_with("import cycle between files: mm/")),
        "{p:#?}"
    );
}
