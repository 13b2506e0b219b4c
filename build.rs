//! Builds the CUDA emulator: every kernels/*.cu compiled by the host C++ compiler with
//! kernels/emu/cuda_emu.h force-included, plus the emulator runtime, plus generated trampolines.
//!
//! Kernels are discovered by parsing `extern "C" __global__ void NAME(PARAMS)`. For each kernel
//! the build generates a C++ trampoline (argument slots -> typed call, with a static_assert that
//! the parsed parameter kinds match the compiler's) and a Rust table entry (name, source file,
//! parameter names and kinds, static shared memory read from the object's TLS symbols), written
//! to $OUT_DIR/kernels.rs together with the embedded sources for NVRTC.
//!
//! The integer `#define`s of kernels/*.cu and *.cuh (thread counts, tile sizes, limits) become
//! Rust constants in $OUT_DIR/kernel_constants.rs, so the launch code reads the kernels' own
//! numbers instead of copies (see [`integer_defines`]).
//!
//! Feature `emu-asan` compiles the emulator and kernels with AddressSanitizer and links its
//! runtime into every binary of the package; misaligned accesses trap (UBSan's alignment check,
//! which needs no runtime).
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq, Debug)]
enum ParamKind {
    Ptr,
    I32,
    U32,
    F32,
    /// `KvLayout` (kernels/kv_layout.cuh) by value.
    KvLayout,
}

impl ParamKind {
    fn letter(self) -> char {
        match self {
            ParamKind::Ptr => 'P',
            ParamKind::I32 => 'I',
            ParamKind::U32 => 'U',
            ParamKind::F32 => 'F',
            ParamKind::KvLayout => 'L',
        }
    }
    fn rust_name(self) -> &'static str {
        match self {
            ParamKind::Ptr => "Ptr",
            ParamKind::I32 => "I32",
            ParamKind::U32 => "U32",
            ParamKind::F32 => "F32",
            ParamKind::KvLayout => "KvLayout",
        }
    }
}

struct Kernel {
    name: String,
    params: Vec<(String, ParamKind)>,
}

struct SourceFile {
    path: PathBuf,
    file_name: String,
    kernels: Vec<Kernel>,
}

fn main() {
    if let Err(message) = run() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let kernels_dir = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed=kernels");

    let sources = discover_sources(&kernels_dir)?;
    let emu_dir = out_dir.join("emu");
    fs::create_dir_all(&emu_dir).map_err(|e| format!("{}: {e}", emu_dir.display()))?;

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(true)
        .extra_warnings(false)
        .include(&kernels_dir)
        .flag("-include")
        .flag(kernels_dir.join("emu/cuda_emu.h"))
        // Kernels type-pun through reinterpret_cast as CUDA code does.
        .flag("-fno-strict-aliasing")
        // __shared__ is a static __thread variable of the executable: no __tls_get_addr calls.
        .flag("-ftls-model=initial-exec")
        .flag("-Wno-unknown-pragmas")
        .file(kernels_dir.join("emu/cuda_emu.cpp"));
    let sanitize = std::env::var_os("CARGO_FEATURE_EMU_ASAN").is_some();
    if sanitize {
        build
            .flag("-fsanitize=address")
            .flag("-fsanitize-recover=address")
            // A misaligned access through a typed pointer (a uint4 load at an address that is
            // not a multiple of 16) traps (SIGILL): x86 performs it, a GPU faults.
            .flag("-fsanitize=alignment")
            .flag("-fsanitize-undefined-trap-on-error")
            .flag("-fno-omit-frame-pointer");
        // rustc links with -nodefaultlibs, so the compiler driver does not add the runtime:
        // link gcc's static one whole (interceptors such as malloc must be in the executable).
        let compiler = build.get_compiler();
        let runtime_file = |name: &str| -> Result<String, String> {
            let output = compiler
                .to_command()
                .arg(format!("-print-file-name={name}"))
                .output()
                .map_err(|e| format!("asking the C++ compiler for {name}: {e}"))?;
            let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if !Path::new(&path).is_absolute() {
                return Err(format!(
                    "the C++ compiler has no {name} (needed by feature emu-asan)"
                ));
            }
            Ok(path)
        };
        println!(
            "cargo:rustc-link-arg={}",
            runtime_file("libasan_preinit.o")?
        );
        println!("cargo:rustc-link-arg=-Wl,--whole-archive");
        println!("cargo:rustc-link-arg={}", runtime_file("libasan.a")?);
        println!("cargo:rustc-link-arg=-Wl,--no-whole-archive");
        for library in ["-lpthread", "-ldl", "-lrt", "-lm"] {
            println!("cargo:rustc-link-arg={library}");
        }
    }

    let mut table_cpp = String::from(
        "// Generated by build.rs: the emulator's kernel table, in the order of the Rust table.\n\
         #include <cstdint>\nextern \"C\" {\n\
         struct KvlabEmuKernel { const char* name; void (*trampoline)(const uint64_t*); };\n",
    );
    let mut entries = String::new();
    for source in &sources {
        let mut wrapper = format!(
            "// Generated by build.rs: {} and its trampolines.\n#include \"{}\"\n",
            source.file_name,
            source.path.display()
        );
        for kernel in &source.kernels {
            let letters: String = kernel
                .params
                .iter()
                .map(|(_, kind)| kind.letter())
                .collect();
            writeln!(
                wrapper,
                "static_assert(kvlab_emu::parameter_kinds_are(&{name}, \"{letters}\"), \
                 \"kernels/{file}: build.rs parsed the parameters of {name} as {letters} \
                 (P pointer, I int, U unsigned, F float, L KvLayout); the compiler disagrees\");\n\
                 extern \"C\" void kvlab_emu_trampoline_{name}(const uint64_t* slots) {{ \
                 kvlab_emu::invoke_kernel(&{name}, slots); }}",
                name = kernel.name,
                file = source.file_name,
            )
            .unwrap();
            writeln!(
                table_cpp,
                "void kvlab_emu_trampoline_{}(const uint64_t*);",
                kernel.name
            )
            .unwrap();
            writeln!(
                entries,
                "    {{\"{0}\", kvlab_emu_trampoline_{0}}},",
                kernel.name
            )
            .unwrap();
        }
        let wrapper_path =
            emu_dir.join(format!("{}.cpp", source.file_name.trim_end_matches(".cu")));
        write_if_changed(&wrapper_path, &wrapper)?;
        build.file(&wrapper_path);
    }
    let kernel_count: usize = sources.iter().map(|s| s.kernels.len()).sum();
    writeln!(
        table_cpp,
        "extern const KvlabEmuKernel kvlab_emu_kernels[] = {{\n{entries}    {{nullptr, nullptr}},\n}};\n\
         extern const uint32_t kvlab_emu_kernel_count = {kernel_count};\n}}"
    )
    .unwrap();
    let table_path = emu_dir.join("kernel_table.cpp");
    write_if_changed(&table_path, &table_cpp)?;
    build.file(&table_path);

    let objects = build.compile_intermediates();
    let static_shared = static_shared_bytes(&objects, &sources)?;
    cc::Build::new()
        .cpp(true)
        .objects(&objects)
        .compile("kvlab_cuda_emu");

    write_if_changed(
        &out_dir.join("kernels.rs"),
        &rust_table(&sources, &static_shared, &kernels_dir),
    )?;
    write_if_changed(
        &out_dir.join("kernel_constants.rs"),
        &integer_defines(&kernels_dir)?,
    )
}

/// The integer constants of kernels/*.cu and *.cuh as Rust items: every object-like
/// `#define NAME BODY` outside `#if` blocks whose body is integer literals (suffixes `u`, `l`
/// dropped), names of other such constants, parentheses and `+ - * / % << >> & |`; C and Rust
/// read such an expression alike, so rustc evaluates it (as `usize`) and rejects what overflows.
/// Other defines (floats, function-like macros, casts) are left out. A name defined twice with
/// different bodies is an error: the constants share one namespace.
fn integer_defines(kernels_dir: &Path) -> Result<String, String> {
    let mut paths: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .map_err(|e| format!("{}: {e}", kernels_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "cu" || ext == "cuh")
        })
        .collect();
    paths.sort();
    // name -> (body as Rust, the names it uses, file)
    let mut defines: std::collections::BTreeMap<String, (String, Vec<String>, String)> =
        Default::default();
    for path in &paths {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = strip_comments(&text).replace("\\\n", " ");
        let mut conditional_depth = 0usize;
        for line in text.lines() {
            let Some(directive) = line.trim_start().strip_prefix('#') else {
                continue;
            };
            let directive = directive.trim_start();
            let word_len = directive
                .find(|c: char| !is_ident(c))
                .unwrap_or(directive.len());
            match &directive[..word_len] {
                "if" | "ifdef" | "ifndef" => conditional_depth += 1,
                "endif" => conditional_depth = conditional_depth.saturating_sub(1),
                "define" if conditional_depth == 0 => {
                    let rest = directive[word_len..].trim_start();
                    let name_len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
                    let (name, body) = rest.split_at(name_len);
                    // `NAME(` is a function-like macro.
                    if name.is_empty() || body.starts_with('(') {
                        continue;
                    }
                    let Some((rust, uses)) = integer_expression(body.trim()) else {
                        continue;
                    };
                    if let Some((other, _, other_file)) = defines.get(name) {
                        if *other != rust {
                            return Err(format!(
                                "`{name}` is defined as `{other}` in kernels/{other_file} and as \
                                 `{rust}` in kernels/{file}; kernel constants share one namespace"
                            ));
                        }
                        continue;
                    }
                    defines.insert(name.to_string(), (rust, uses, file.clone()));
                }
                _ => {}
            }
        }
    }
    // Drop defines that use a name which is not itself a constant, until none does.
    loop {
        let unresolved: Vec<String> = defines
            .iter()
            .filter(|(_, (_, uses, _))| uses.iter().any(|u| !defines.contains_key(u)))
            .map(|(name, _)| name.clone())
            .collect();
        if unresolved.is_empty() {
            break;
        }
        for name in unresolved {
            defines.remove(&name);
        }
    }
    let mut out =
        String::from("// Generated by build.rs from the #defines of kernels/*.cu and *.cuh.\n");
    for (name, (rust, _, file)) in &defines {
        writeln!(
            out,
            "/// `#define {name} {rust}` in kernels/{file}.\npub const {name}: usize = {rust};"
        )
        .unwrap();
    }
    Ok(out)
}

/// `body` as a Rust constant expression and the names it uses, if it is an integer expression
/// (see [`integer_defines`]).
fn integer_expression(body: &str) -> Option<(String, Vec<String>)> {
    let mut rust = String::new();
    let mut uses = Vec::new();
    let mut chars = body.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c.is_ascii_digit() {
            let mut end = at + c.len_utf8();
            while let Some(&(i, d)) = chars.peek() {
                if !is_ident(d) {
                    break;
                }
                end = i + d.len_utf8();
                chars.next();
            }
            let literal = body[at..end].trim_end_matches(['u', 'U', 'l', 'L']);
            let digits_ok = match literal.strip_prefix("0x").or(literal.strip_prefix("0X")) {
                Some(hex) => !hex.is_empty() && hex.chars().all(|d| d.is_ascii_hexdigit()),
                None => literal.chars().all(|d| d.is_ascii_digit()),
            };
            if !digits_ok {
                return None;
            }
            rust.push_str(literal);
        } else if is_ident(c) {
            let mut end = at + c.len_utf8();
            while let Some(&(i, d)) = chars.peek() {
                if !is_ident(d) {
                    break;
                }
                end = i + d.len_utf8();
                chars.next();
            }
            uses.push(body[at..end].to_string());
            rust.push_str(&body[at..end]);
        } else if c == '<' || c == '>' {
            chars.next_if(|&(_, d)| d == c)?;
            rust.push(c);
            rust.push(c);
        } else if "+-*/%()&| ".contains(c) {
            rust.push(c);
        } else {
            return None;
        }
    }
    (!rust.trim().is_empty()).then_some((rust.trim().to_string(), uses))
}

fn discover_sources(kernels_dir: &Path) -> Result<Vec<SourceFile>, String> {
    let mut paths: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .map_err(|e| format!("{}: {e}", kernels_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    paths.sort();
    let mut sources = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for path in paths {
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let kernels = parse_kernels(&strip_comments(&text))
            .map_err(|e| format!("kernels/{file_name}: {e}"))?;
        for kernel in &kernels {
            if let Some(other) = seen.insert(kernel.name.clone(), file_name.clone()) {
                return Err(format!(
                    "kernel `{}` is defined in kernels/{other} and kernels/{file_name}",
                    kernel.name
                ));
            }
        }
        sources.push(SourceFile {
            path,
            file_name,
            kernels,
        });
    }
    Ok(sources)
}

/// Replaces comments by spaces (keeping newlines), leaving string and char literals alone.
fn strip_comments(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(bytes.len(), |n| i + n);
            out.push_str(&" ".repeat(end - i));
            i = end;
        } else if let Some(comment) = rest.strip_prefix("/*") {
            let end = comment.find("*/").map_or(bytes.len(), |n| i + 2 + n + 2);
            out.extend(
                text[i..end]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' }),
            );
            i = end;
        } else if bytes[i] == b'"' || bytes[i] == b'\'' {
            let quote = bytes[i];
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != quote {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(bytes.len());
            out.push_str(&text[i..end]);
            i = end;
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Finds `extern "C" __global__ void NAME(PARAMS)`; `__launch_bounds__(...)` may appear among
/// the specifiers. Any other `__global__` is an error: kernels must have C linkage.
fn parse_kernels(text: &str) -> Result<Vec<Kernel>, String> {
    let mut kernels = Vec::new();
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find("__global__") {
        let at = search_from + found;
        search_from = at + "__global__".len();
        let before_ok = text[..at].chars().next_back().is_none_or(|c| !is_ident(c));
        let after_ok = text[search_from..]
            .chars()
            .next()
            .is_none_or(|c| !is_ident(c));
        if !before_ok || !after_ok {
            continue;
        }
        let line = text[..at].matches('\n').count() + 1;
        if !text[..at].trim_end().ends_with("extern \"C\"") {
            return Err(format!("line {line}: a __global__ function must be declared `extern \"C\" __global__ void`"));
        }
        let mut rest = text[search_from..].trim_start();
        let mut saw_void = false;
        loop {
            if let Some(after) = rest.strip_prefix("void") {
                if after.starts_with(|c: char| !is_ident(c)) {
                    saw_void = true;
                    rest = after.trim_start();
                    continue;
                }
            }
            if let Some(after) = rest.strip_prefix("__launch_bounds__") {
                let after = after.trim_start();
                let close = after
                    .find(')')
                    .ok_or(format!("line {line}: unterminated __launch_bounds__"))?;
                rest = after[close + 1..].trim_start();
                continue;
            }
            break;
        }
        if !saw_void {
            return Err(format!("line {line}: a kernel must return void"));
        }
        let name_len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        let name = rest[..name_len].to_string();
        let rest = rest[name_len..].trim_start();
        if name.is_empty() || !rest.starts_with('(') {
            return Err(format!(
                "line {line}: expected `NAME(` after `extern \"C\" __global__ void`"
            ));
        }
        let close = rest.find(')').ok_or(format!(
            "line {line}: unterminated parameter list of {name}"
        ))?;
        let params = parse_params(&rest[1..close])
            .map_err(|e| format!("line {line}: kernel {name}: {e}"))?;
        kernels.push(Kernel { name, params });
    }
    Ok(kernels)
}

fn parse_params(list: &str) -> Result<Vec<(String, ParamKind)>, String> {
    let list = list.trim();
    if list.is_empty() || list == "void" {
        return Ok(Vec::new());
    }
    let mut params = Vec::new();
    for (index, param) in list.split(',').enumerate() {
        let spaced = param.replace('*', " * ");
        let words: Vec<&str> = spaced
            .split_whitespace()
            .filter(|w| !matches!(*w, "const" | "__restrict__"))
            .collect();
        if words.len() < 2 {
            return Err(format!(
                "parameter {index} `{}` needs a type and a name",
                param.trim()
            ));
        }
        let (name, type_words) = words.split_last().unwrap();
        let kind = if type_words.contains(&"*") {
            ParamKind::Ptr
        } else {
            match type_words.join(" ").as_str() {
                "int" | "int32_t" => ParamKind::I32,
                "unsigned" | "unsigned int" | "uint32_t" => ParamKind::U32,
                "float" => ParamKind::F32,
                "KvLayout" => ParamKind::KvLayout,
                other => {
                    return Err(format!(
                        "parameter {index} `{name}` has type `{other}`; kernel arguments are pointers, int, \
                         unsigned, float or KvLayout"
                    ))
                }
            }
        };
        params.push((name.to_string(), kind));
    }
    Ok(params)
}

/// Static shared memory per kernel: the sizes of the TLS symbols that are function-local statics
/// of the kernel itself (`__shared__` is `static __thread` in the emulator build; an extern "C"
/// kernel's locals mangle as `_ZZ<len><name>E...`). `__shared__` variables declared inside
/// `__device__` helpers are not attributed to a kernel.
fn static_shared_bytes(
    objects: &[PathBuf],
    sources: &[SourceFile],
) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let mut per_kernel = std::collections::BTreeMap::new();
    for object in objects {
        let bytes = fs::read(object).map_err(|e| format!("{}: {e}", object.display()))?;
        for (symbol, size) in
            elf_tls_symbols(&bytes).map_err(|e| format!("{}: {e}", object.display()))?
        {
            for kernel in sources.iter().flat_map(|s| &s.kernels) {
                let prefix = format!("_ZZ{}{}E", kernel.name.len(), kernel.name);
                if symbol.starts_with(&prefix) {
                    *per_kernel.entry(kernel.name.clone()).or_insert(0) += size;
                }
            }
        }
    }
    Ok(per_kernel)
}

/// (name, size) of every STT_TLS symbol of a little-endian ELF64 relocatable object.
fn elf_tls_symbols(elf: &[u8]) -> Result<Vec<(String, u64)>, String> {
    let u16_at = |at: usize| -> Result<u64, String> {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u64)
            .ok_or("truncated ELF".to_string())
    };
    let u32_at = |at: usize| -> Result<u64, String> {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as u64)
            .ok_or("truncated ELF".to_string())
    };
    let u64_at = |at: usize| -> Result<u64, String> {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or("truncated ELF".to_string())
    };
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a little-endian ELF64 object".to_string());
    }
    let section_offset = u64_at(0x28)? as usize;
    let section_size = u16_at(0x3a)? as usize;
    let section_count = u16_at(0x3c)? as usize;
    let section = |index: usize| section_offset + index * section_size;
    let mut symbols = Vec::new();
    for index in 0..section_count {
        const SHT_SYMTAB: u64 = 2;
        if u32_at(section(index) + 4)? != SHT_SYMTAB {
            continue;
        }
        let table_offset = u64_at(section(index) + 24)? as usize;
        let table_size = u64_at(section(index) + 32)? as usize;
        let strings_offset = u64_at(section(u32_at(section(index) + 40)? as usize) + 24)? as usize;
        for entry in (table_offset..table_offset + table_size).step_by(24) {
            const STT_TLS: u8 = 6;
            if elf.get(entry + 4).is_none_or(|info| info & 0xf != STT_TLS) {
                continue;
            }
            let name_start = strings_offset + u32_at(entry)? as usize;
            let name_len = elf[name_start..]
                .iter()
                .position(|&b| b == 0)
                .ok_or("unterminated symbol name")?;
            let name =
                String::from_utf8_lossy(&elf[name_start..name_start + name_len]).into_owned();
            symbols.push((name, u64_at(entry + 16)?));
        }
    }
    Ok(symbols)
}

fn rust_table(
    sources: &[SourceFile],
    static_shared: &std::collections::BTreeMap<String, u64>,
    kernels_dir: &Path,
) -> String {
    let mut out = String::from("// Generated by build.rs from kernels/*.cu.\n\n");
    out.push_str("/// Every kernel, in the emulator's table order.\npub const KERNELS: &[KernelSignature] = &[\n");
    for source in sources {
        for kernel in &source.kernels {
            let params: Vec<String> = kernel
                .params
                .iter()
                .map(|(name, kind)| {
                    format!(
                        "KernelParam {{ name: \"{name}\", kind: ParamKind::{} }}",
                        kind.rust_name()
                    )
                })
                .collect();
            writeln!(
                out,
                "    KernelSignature {{ name: \"{}\", source_file: \"{}\", params: &[{}], static_shared_bytes: {} }},",
                kernel.name,
                source.file_name,
                params.join(", "),
                static_shared.get(&kernel.name).copied().unwrap_or(0)
            )
            .unwrap();
        }
    }
    out.push_str("];\n\n/// Every kernels/*.cu, embedded for NVRTC.\npub const KERNEL_SOURCES: &[KernelSource] = &[\n");
    for source in sources {
        writeln!(
            out,
            "    KernelSource {{ file: \"{}\", text: include_str!({:?}) }},",
            source.file_name,
            source.path.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n\n/// Every kernels/*.cuh, embedded for NVRTC as named headers.\npub const KERNEL_HEADERS: &[KernelSource] = &[\n");
    let mut headers: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    headers.retain(|path| path.extension().is_some_and(|ext| ext == "cuh"));
    headers.sort();
    for header in headers {
        writeln!(
            out,
            "    KernelSource {{ file: \"{}\", text: include_str!({:?}) }},",
            header.file_name().unwrap().to_string_lossy(),
            header.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    out
}

fn write_if_changed(path: &Path, contents: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    fs::write(path, contents).map_err(|e| format!("{}: {e}", path.display()))
}
